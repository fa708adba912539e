"""Hostile PyTorch and llama2.c `.bin` files (issue 14): each ends in a one-line SlimllmError,
in bounded time and memory, before the loader allocates what the file merely declares.

The cases that took the process down on main (a segfault, a hang, gigabytes allocated) run in a
child under `bounded` (an address-space cap and a wall-time limit), which reports the child's
time and peak resident memory; the test asserts the child caught the expected error and stayed
under ONE_CASE. Files are made here field by field (`raw_zip` writes a zip archive whose
records may declare any size), so nothing depends on the writer being lenient.
"""

from __future__ import annotations

import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fuzz.harness import bounded, outcome
from test_torch_bin import make_legacy, make_zip, p_dict, p_storage, p_str, p_tensor, p_top

from conftest import FIXTURES, STORIES
from slimllm.weights.torch_bin import list_torch_bin, load_torch_bin
from slimllm.weights.torch_bin_write import write_torch_bin

ONE_CASE = (2.0, 200.0)  # seconds (past interpreter start-up) and peak MB per hostile file
SPARSE = 40 * 2**30  # the size of the sparse files: far more than the test machine's memory

CHILD = """
from slimllm.reference.errors import SlimllmError
from slimllm.weights.torch_bin import load_torch_bin, list_torch_bin
from slimllm.weights.llama2c import read_llama2c
from slimllm.weights import load_checkpoint
try:
    {call}({path!r})
    print("loaded")
except SlimllmError as e:
    print(type(e).__name__, e)
"""


def in_child(path: Path, call: str = "load_torch_bin") -> str:
    """Load path in a bounded child: its one line of output, once the bounds are checked."""
    run = bounded(CHILD.format(call=call, path=str(path)), seconds=10.0)
    assert run.returncode == 0, run.stderr[-2000:]
    seconds, megabytes = ONE_CASE
    print(f"{path.name} {call}: {run.seconds:.2f} s, {run.peak_mb:.0f} MB peak")
    assert run.seconds < seconds and run.peak_mb < megabytes, (run.seconds, run.peak_mb)
    return run.stdout.strip()


ONE_FLOAT = {"0": np.zeros(1, np.float32).tobytes()}


def one_tensor() -> bytes:
    return p_tensor(p_storage("FloatStorage", "0", 1), 0, (1,), (1,))


def keyed(key: bytes) -> bytes:
    """A state dict with one entry whose key is built by the opcodes `key`."""
    return p_top(pickle.EMPTY_DICT + key + one_tensor() + pickle.SETITEM)


# --- the pickle: nesting, hashing and repr of what the file built -----------------------------


def test_key_nested_200000_deep_is_refused_without_a_crash(tmp_path):
    # main: hashing the key overflowed the C stack (exit 139)
    path = make_zip(
        tmp_path / "deep.bin", keyed(pickle.EMPTY_TUPLE + pickle.TUPLE1 * 200_000), ONE_FLOAT
    )
    assert in_child(path).endswith("is refused: objects nested more than 32 deep (at byte 35)")


def test_key_nested_5000_deep_gives_one_line_not_a_recursion_error(tmp_path):
    # main: RecursionError from the repr in the message
    path = make_zip(
        tmp_path / "deep.bin", keyed(pickle.EMPTY_TUPLE + pickle.TUPLE1 * 5000), ONE_FLOAT
    )
    for read in (load_torch_bin, list_torch_bin):
        message, _ = outcome(read, path)
        assert "objects nested more than 32 deep" in message and str(path) in message


def hash_bomb(rounds: int) -> bytes:
    """t = (t, t), `rounds` times, through the memo: 2**rounds steps to hash, 10 bytes a round."""
    step = pickle.BINGET + b"\0" + pickle.TUPLE2 + pickle.BINPUT + b"\0"  # t on top: (t, t)
    return pickle.EMPTY_TUPLE + pickle.BINPUT + b"\0" + step * rounds


def test_hash_bomb_key_is_refused_without_hashing(tmp_path):
    # main: a 413-byte file hashing 2**80 tuples (still running at 120 s)
    path = make_zip(tmp_path / "bomb.bin", keyed(hash_bomb(80)), ONE_FLOAT)
    assert "is refused: objects nested more than 32 deep" in in_child(path)
    # shallower than the depth bound, it is refused as a key that is not a plain value
    shallow = make_zip(tmp_path / "shallow.bin", keyed(hash_bomb(30)), ONE_FLOAT)
    message, _ = outcome(load_torch_bin, shallow)
    assert "is refused: a dict key that is not a string or number" in message


def test_a_bomb_as_a_value_is_never_hashed_or_printed_whole(tmp_path):
    pkl = p_top(pickle.EMPTY_DICT + p_str("w") + hash_bomb(30) + pickle.SETITEM)
    message, _ = outcome(load_torch_bin, make_zip(tmp_path / "v.bin", pkl, ONE_FLOAT))
    assert message.endswith("entry 'w' is of type tuple, not a tensor")
    long_key = p_top(p_dict({"k" * 10**6: pickle.NONE}))
    message, _ = outcome(load_torch_bin, make_zip(tmp_path / "k.bin", long_key, ONE_FLOAT))
    assert "entry 'kkkkk" in message and "is of type NoneType" in message and len(message) < 400


# list L, memoized; (L,); then L again from the memo, and a list appended to it
LATE_FILL = b"]q\x00" + pickle.TUPLE1 + pickle.POP + b"h\x00" + pickle.EMPTY_LIST + pickle.APPEND


@pytest.mark.parametrize(
    "name, opcodes, why",
    [
        # a list filled after it was nested: its depth would grow unseen
        ("late_fill", LATE_FILL, "an object is changed after being placed in another"),
        # the unpickler would size its memo for index 2**31 (16 GiB)
        ("memo_index", pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**31), "memo index"),
        ("set", pickle.EMPTY_SET, "it builds a set"),
        ("frozenset", pickle.MARK + pickle.FROZENSET, "it builds a frozenset"),
        ("extension", pickle.EXT1 + b"\x01", "copyreg extension"),
        ("big_int", pickle.LONG4 + struct.pack("<i", 4096) + b"\x01" * 4096, "wider than 128"),
        (
            "ordered_dict_args",
            b"ccollections\nOrderedDict\n" + pickle.EMPTY_LIST + pickle.TUPLE1 + pickle.REDUCE,
            "OrderedDict is called with arguments",
        ),
    ],
)
def test_what_a_checkpoint_never_holds_is_refused_before_unpickling(tmp_path, name, opcodes, why):
    pkl = p_top(pickle.EMPTY_DICT + p_str("x") + opcodes + pickle.SETITEM)
    message, _ = outcome(load_torch_bin, make_zip(tmp_path / f"{name}.bin", pkl, ONE_FLOAT))
    assert "my_model/data.pkl is refused: " in message and why in message


def test_memo_index_bomb_stays_small(tmp_path):
    bomb = pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1)
    pkl = p_top(pickle.EMPTY_DICT + p_str("x") + bomb + pickle.SETITEM)
    assert "memo index 4294967295 skips" in in_child(make_zip(tmp_path / "m.bin", pkl, {}))


def test_the_opcode_budget_bounds_the_work(tmp_path, monkeypatch):
    from slimllm.weights import torch_pickle

    monkeypatch.setattr(torch_pickle, "MAX_OPCODES", 1000)
    pkl = p_top(pickle.EMPTY_LIST + (pickle.NONE + pickle.APPEND) * 600)
    message, _ = outcome(load_torch_bin, make_zip(tmp_path / "long.bin", pkl, {}))
    assert "longer than 33554432 bytes or 1000 opcodes" in message


def test_legitimate_state_dict_metadata_still_loads(tmp_path):
    # transformers' state dicts carry `_metadata`, set by BUILD on the OrderedDict
    metadata = p_dict({"_metadata": p_dict({"": p_dict({"version": b"K\x01"})})})
    pkl = p_top(
        b"ccollections\nOrderedDict\n)R"
        + pickle.MARK
        + p_str("w")
        + one_tensor()
        + pickle.SETITEMS
        + metadata
        + pickle.BUILD
    )
    loaded = load_torch_bin(make_zip(tmp_path / "hf.bin", pkl, {"0": b"\0\0\x80?"}))
    assert list(loaded) == ["w"] and loaded["w"].tolist() == [1.0]


# --- views that would expand a small file -----------------------------------------------------


@pytest.mark.parametrize("side", [10**5, 10**10])
def test_stride_zero_view_is_refused_before_it_is_materialised(tmp_path, side):
    # main: 3.8 GB for a 433 KB file before the shape error; larger, a MemoryError
    view = p_tensor(p_storage("FloatStorage", "0", 1), 0, (side, side), (0, 0))
    path = make_zip(tmp_path / "s0.bin", p_top(p_dict({"w": view})), ONE_FLOAT)
    out = in_child(path)
    assert out.startswith("TorchBinError") and "stride (0, 0))" in out
    why = "spans more than" if side * side > 2**48 else f"has {side * side} elements, more than"
    assert why in out


def test_stride_zero_view_through_the_model_loader(tmp_path):
    # the case went through load_checkpoint (open_torch_bin), then failed on the shape
    view = p_tensor(p_storage("FloatStorage", "0", 1), 0, (10**5, 10**5), (0, 0))
    shutil.copy(FIXTURES / "llama" / "config.json", tmp_path / "config.json")
    make_zip(tmp_path / "pytorch_model.bin", p_top(p_dict({"w": view})), ONE_FLOAT)
    out = in_child(tmp_path, "load_checkpoint")
    assert out.startswith("TorchBinError") and "pytorch_model.bin: tensor view" in out


def test_overlapping_view_larger_than_its_storage_is_refused(tmp_path):
    view = p_tensor(p_storage("FloatStorage", "0", 5), 0, (3, 3), (1, 1))
    path = make_zip(tmp_path / "o.bin", p_top(p_dict({"w": view})), {"0": bytes(20)})
    message, _ = outcome(load_torch_bin, path)
    assert "has 9 elements, more than the 5 of its storage '0'" in message
    small = p_tensor(p_storage("FloatStorage", "0", 4), 0, (2, 2), (1, 1))  # 4 of 4: allowed
    ok = make_zip(tmp_path / "ok.bin", p_top(p_dict({"w": small})), {"0": bytes(16)})
    assert load_torch_bin(ok)["w"].shape == (2, 2)


def test_empty_tensor_with_an_absurd_size_is_refused(tmp_path):
    view = p_tensor(p_storage("FloatStorage", "0", 0), 0, (0, 2**60), (2**60, 1))
    path = make_zip(tmp_path / "e.bin", p_top(p_dict({"w": view})), {"0": b""})
    message, _ = outcome(load_torch_bin, path)
    assert "spans more than 281474976710656 elements" in message


# --- zip records that declare more than the file holds ------------------------------------------


LOCAL, CENTRAL = "<4s2B4HL2L2H", "<4s4B4HL2L5H2L"  # zipfile's struct formats
END64, LOCATOR, END = "<4sQ2H2L4Q", "<4sLQL", "<4s4H2LH"
FULL = 0xFFFFFFFF  # "see the zip64 field"


def zip_end(f, entries: int, size: int, start: int) -> None:
    """The zip64 end record, its locator and the classic end record pointing to them."""
    at = f.tell()
    f.write(struct.pack(END64, b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, start))
    f.write(struct.pack(LOCATOR, b"PK\x06\x07", 0, at, 1))
    f.write(struct.pack(END, b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, FULL, FULL, 0))


def raw_zip(path: Path, records) -> Path:
    """A zip archive written field by field: records are (name, data, declared size, method,
    crc) with method 0 (stored) or 8 (data already deflated), data being bytes or the size of a
    hole (a sparse run of zeros); every size is in a zip64 field so any may be declared."""
    central = []
    with open(path, "wb") as f:
        for name, data, declared, method, crc in records:
            offset, encoded = f.tell(), name.encode()
            held = data if isinstance(data, int) else len(data)
            extra = struct.pack("<HHQQ", 1, 16, declared, held)
            fields = (45, 0, 0, method, 0, 33, crc, FULL, FULL, len(encoded), len(extra))
            f.write(struct.pack(LOCAL, b"PK\x03\x04", *fields) + encoded + extra)
            if isinstance(data, int):
                f.seek(data, 1)
            else:
                f.write(data)
            extra = struct.pack("<HHQQQ", 1, 24, declared, held, offset)
            fields = (45, 3, 45, 0, 0, method, 0, 33, crc, FULL, FULL, len(encoded), len(extra))
            entry = struct.pack(CENTRAL, b"PK\x01\x02", *fields, 0, 0, 0, 0, FULL)
            central.append(entry + encoded + extra)
        start = f.tell()
        f.write(b"".join(central))
        zip_end(f, len(central), f.tell() - start, start)
    return path


def stored(name: str, data: bytes, declared: int | None = None):
    return (name, data, len(data) if declared is None else declared, 0, zlib.crc32(data))


def test_raw_zip_writes_what_the_reader_loads(tmp_path):
    pkl = p_top(p_dict({"w": p_tensor(p_storage("FloatStorage", "0", 2), 0, (2,), (1,))}))
    values = np.array([1.5, -2.0], np.float32)
    path = raw_zip(
        tmp_path / "ok.bin", [stored("a/data.pkl", pkl), stored("a/data/0", values.tobytes())]
    )
    assert load_torch_bin(path)["w"].tolist() == [1.5, -2.0]


def test_record_declaring_10e12_bytes_is_refused_before_allocating(tmp_path):
    # main: MemoryError traceback from allocating the declared storage
    numel = 10**12 // 4
    pkl = p_top(p_dict({"w": p_tensor(p_storage("FloatStorage", "0", numel), 0, (numel,), (1,))}))
    path = raw_zip(
        tmp_path / "big.bin", [stored("a/data.pkl", pkl), stored("a/data/0", bytes(64), 10**12)]
    )
    out = in_child(path)
    assert (
        out.startswith("TorchBinError")
        and "declares 1000000000000 bytes, more than the file's size" in out
    )
    # the same lie in the pickle's own record
    path = raw_zip(tmp_path / "pkl.bin", [stored("a/data.pkl", pkl, 10**12)])
    assert "record a/data.pkl declares 1000000000000 bytes" in in_child(path, "list_torch_bin")


def deflate_bomb(size: int) -> tuple[bytes, int]:
    """Raw deflate data of `size` zero bytes (a multiple of 16 MiB), and its CRC-32, cheaply:
    one block of zeros, compressed after a full flush, repeats exactly."""
    chunk = bytes(1 << 24)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return block * (size // len(chunk)) + b"\x03\x00", crc


def test_deflate_bomb_storage_is_refused(tmp_path):
    # main: a 1 MB record inflated to 1 GiB and accepted
    size = 2**30
    bomb, crc = deflate_bomb(size)
    inflated = zlib.decompressobj(-15).decompress(bomb[:100_000], 2**20)
    assert len(bomb) < 2**21 and inflated == bytes(2**20)
    numel = size // 4
    pkl = p_top(p_dict({"w": p_tensor(p_storage("FloatStorage", "0", numel), 0, (numel,), (1,))}))
    path = raw_zip(
        tmp_path / "bomb.bin", [stored("a/data.pkl", pkl), ("a/data/0", bomb, size, 8, crc)]
    )
    out = in_child(path)
    assert "record a/data/0 declares 1073741824 bytes, more than the file's size" in out


def test_compressed_storage_within_the_file_size_is_still_refused(tmp_path):
    # torch.save stores records; a compressed storage is refused however small
    data = np.zeros(4, np.float32).tobytes()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = packer.compress(data) + packer.flush()
    pkl = p_top(p_dict({"w": p_tensor(p_storage("FloatStorage", "0", 4), 0, (4,), (1,))}))
    path = raw_zip(
        tmp_path / "z.bin",
        [stored("a/data.pkl", pkl), ("a/data/0", packed, 16, 8, zlib.crc32(data))],
    )
    message, _ = outcome(load_torch_bin, path)
    assert "storage record a/data/0 is compressed, not stored" in message


# --- 40 GB sparse files: the header is checked against the size before anything is read -------


def sparse(path: Path) -> Path:
    with open(path, "r+b") as f:
        f.truncate(SPARSE)
    return path


def test_sparse_zip_checkpoint_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "zip.bin"
    write_torch_bin(path, {"w": np.ones((4, 4), np.float32)})
    assert "not a readable zip archive" in in_child(sparse(path))
    # a central directory at the end that declares 40 GB: refused, not read
    cd = tmp_path / "cd.bin"
    with open(cd, "wb") as f:
        f.write(b"PK\x03\x04")
        f.seek(SPARSE)
        zip_end(f, 1, SPARSE, 0)
    assert f"the zip structure asks to read {SPARSE} bytes at once" in in_child(cd)


def test_sparse_storage_record_is_listed_without_reading_it(tmp_path):
    # a valid archive whose one storage record is a 40 GB hole: listing reads only the pickle,
    # and a pickle declaring a different size is refused before any data is read
    numel = SPARSE // 4
    for declared in (numel, numel - 1):
        tensor = p_tensor(p_storage("FloatStorage", "0", declared), 0, (declared,), (1,))
        records = [
            stored("a/data.pkl", p_top(p_dict({"w": tensor}))),
            ("a/data/0", SPARSE, SPARSE, 0, 0),
        ]
        path = raw_zip(tmp_path / "hole.bin", records)
        assert in_child(path, "list_torch_bin") == "loaded"
    assert "holds 42949672960 bytes, but the pickle declares 10737418239" in in_child(path)


def test_sparse_legacy_checkpoint_is_refused_without_reading_it(tmp_path):
    pkl = p_top(p_dict({"w": p_tensor(p_storage("FloatStorage", "0", 16), 0, (4, 4), (4, 1))}))
    path = make_legacy(tmp_path / "legacy.bin", pkl, {"0": np.ones(16, np.float32)})
    out = in_child(sparse(path))  # main: loaded, ignoring 40 GB after the last storage
    assert out.startswith("TorchBinError") and "bytes follow the last storage" in out


def test_sparse_llama2c_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "stories.bin"
    shutil.copy(STORIES / "stories260K.bin", path)
    out = in_child(sparse(path), "read_llama2c")
    assert out.startswith("CheckpointError") and "unexpected trailing values" in out


def test_names_from_the_file_are_shown_on_one_line(tmp_path):
    # STACK_GLOBAL takes its names from strings, which may hold newlines and NULs
    def binary(text: bytes) -> bytes:
        return pickle.BINUNICODE + struct.pack("<I", len(text)) + text

    evil = binary(b"os\nsystem") + binary(b"x\x00y") + pickle.STACK_GLOBAL
    pkl = p_top(pickle.EMPTY_DICT + p_str("x") + evil + pickle.SETITEM)
    message, _ = outcome(load_torch_bin, make_zip(tmp_path / "n.bin", pkl, {}))
    assert "forbidden global os\\nsystem.x\\x00y" in message


def test_a_name_set_twice_is_refused_not_last_wins(tmp_path):
    twice = p_str("w") + one_tensor() + p_str("w") + one_tensor()
    pkl = p_top(pickle.EMPTY_DICT + pickle.MARK + twice + pickle.SETITEMS)
    message, _ = outcome(load_torch_bin, make_zip(tmp_path / "d.bin", pkl, ONE_FLOAT))
    assert "is refused: the key 'w' is set twice in one dict" in message
