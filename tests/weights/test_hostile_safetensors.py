"""Hostile and broken safetensors files and shard indexes (issue 14): each case found is refused
with a CheckpointError naming the file and the tensor, before any tensor data is read.

Every case starts from a copy of the llama fixture (a valid single-file checkpoint, or the same
tensors split into two shards by an index) and changes one thing.
"""

import json
import shutil
import sys

import numpy as np
import pytest
from fuzz.harness import bounded
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES
from slimllm.weights import load_checkpoint
from slimllm.weights.io import MAX_HEADER, CheckpointError

SOURCE = FIXTURES / "llama" / "model.safetensors"
RAW = SOURCE.read_bytes()
N = int.from_bytes(RAW[:8], "little")
HEADER = json.loads(RAW[8 : 8 + N])
DATA = RAW[8 + N :]
FIRST = "lm_head.weight"  # the first tensor in the data section: F32 [256, 64] at [0, 65536)
SECOND = "model.embed_tokens.weight"  # the same dtype and shape, at [65536, 131072)


@pytest.fixture
def ckpt(tmp_path):
    for name in ("config.json", "generation_config.json"):
        shutil.copy(FIXTURES / "llama" / name, tmp_path / name)
    return tmp_path


def write(directory, header: bytes, data: bytes = DATA, length: int | None = None):
    """model.safetensors made of a header's bytes (its length field: `length`) and data."""
    size = len(header) if length is None else length
    (directory / "model.safetensors").write_bytes(size.to_bytes(8, "little") + header + data)


def edited(edit) -> bytes:
    """The fixture's header JSON after `edit(header)` (which may return a replacement)."""
    header = json.loads(json.dumps(HEADER))
    replaced = edit(header)
    return json.dumps(header if replaced is None else replaced).encode()


def entry(**changes):
    """An edit changing the first tensor's entry (a value None: the key removed)."""

    def edit(header):
        header[FIRST] |= changes
        header[FIRST] = {k: v for k, v in header[FIRST].items() if v is not None}

    return edit


def refused(directory, message: str) -> str:
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(directory, tokenizer=False)
    text = str(e.value)
    assert "\n" not in text and "model.safetensors" in text, text
    return text


# Each header case of issue 14 (tracebacks then, or accepted with a wrong result) and the
# message that now refuses it.
HEADERS = {
    "json_list": (b"[1, 2]", r"safetensors header is a JSON list, expected an object"),
    "json_number": (b"42", r"safetensors header is a JSON int, expected an object"),
    "entry_is_a_string": (
        edited(lambda h: h.__setitem__(FIRST, "x")),
        rf"tensor {FIRST}: header entry is 'x', expected an object",
    ),
    "no_data_offsets": (
        edited(entry(data_offsets=None)),
        rf"tensor {FIRST}: data_offsets None is not two integers",
    ),
    "offsets_are_strings": (
        edited(entry(data_offsets=["0", "65536"])),
        rf"tensor {FIRST}: data_offsets \['0', '65536'\] is not two integers",
    ),
    "three_offsets": (  # "too many values to unpack" in the old reader
        edited(entry(data_offsets=[0, 65536, 65536])),
        rf"tensor {FIRST}: data_offsets \[0, 65536, 65536\] is not two integers",
    ),
    "dtype_is_a_list": (
        edited(entry(dtype=["F32"])),
        rf"tensor {FIRST}: dtype \['F32'\] is not one of F64, F32",
    ),
    "shape_of_floats": (
        edited(entry(shape=[256.0, 64.0])),
        rf"tensor {FIRST}: shape \[256.0, 64.0\] is not a list of sizes in \[0, 2\*\*64\)",
    ),
    "shape_negative": (
        edited(entry(shape=[-256, -64])),
        rf"tensor {FIRST}: shape \[-256, -64\] is not a list of sizes in \[0, 2\*\*64\)",
    ),
    "shape_huge": (
        edited(entry(shape=[2**70, 1])),
        rf"tensor {FIRST}: shape \[{2**70}, 1\] is not a list of sizes in",
    ),
    "shape_overflowing_int64": (  # 2**64 elements: 0 in int64, "cannot reshape array of size 0"
        edited(entry(shape=[2**32, 2**32])),
        rf"tensor {FIRST}: data_offsets \[0, 65536\] do not hold F32",
    ),
    "shape_of_many_huge_sizes": (  # never multiplied out
        edited(entry(shape=[2**63] * 100_000)),
        rf"tensor {FIRST}: data_offsets \[0, 65536\] do not hold F32 .* \(more than the file",
    ),
    "number_too_long_to_convert": (  # Python refuses ints of over 4300 digits: a ValueError
        edited(lambda h: None)[:-1] + b', "x": ' + b"9" * 5000 + b"}",
        r"safetensors header: not valid JSON \(.*Exceeds the limit",
    ),
    "offsets_negative": (  # sliced from the end of the data in the old reader
        edited(entry(data_offsets=[len(DATA) - 65536 - len(DATA), 0])),
        rf"tensor {FIRST}: data_offsets \[-65536, 0\] do not hold F32 \[256, 64\] \(65536 bytes\)",
    ),
    "offsets_reversed": (
        edited(entry(data_offsets=[65536, 0])),
        rf"tensor {FIRST}: data_offsets \[65536, 0\] do not hold",
    ),
    "overlapping_tensors": (
        edited(lambda h: h[SECOND].__setitem__("data_offsets", [0, 65536])),
        rf"tensor {SECOND} at \[0, 65536\) overlaps {FIRST}",
    ),
    "duplicate_name_same_entry": (
        edited(lambda h: None)[:-1] + b", " + json.dumps({FIRST: HEADER[FIRST]})[1:].encode(),
        rf"header: '{FIRST}' appears twice in one JSON object",
    ),
    "duplicate_name_last_one_wins": (  # the first entry a decoy, the second the real one
        b'{"'
        + FIRST.encode()
        + b'": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        + edited(lambda h: None)[1:],
        rf"header: '{FIRST}' appears twice in one JSON object",
    ),
    "gap_between_tensors": (
        edited(lambda h: h.pop(FIRST) and None),
        rf"tensor {SECOND} at \[65536, 131072\) leaves bytes \[0, 65536\) unused",
    ),
    "metadata_not_strings": (
        edited(lambda h: h.__setitem__("__metadata__", {"format": 1})),
        r"__metadata__ must map names to strings",
    ),
    "not_utf8": (b'{"\xff": 1}', r"safetensors header: not valid JSON"),
    "deeply_nested": (b"[" * 100_000 + b"]" * 100_000, r"safetensors header: not valid JSON"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_broken_header_is_refused_naming_file_and_tensor(ckpt, case):
    header, message = HEADERS[case]
    write(ckpt, header)
    refused(ckpt, message)


def test_header_length_past_the_end_of_the_file(ckpt):
    write(ckpt, edited(lambda h: None), DATA[:100], length=N + len(DATA))
    refused(ckpt, rf"its header length {N + len(DATA)} does not fit in")
    write(ckpt, b"{}", b"", length=MAX_HEADER + 1)
    refused(ckpt, rf"header length {MAX_HEADER + 1} does not fit")
    (ckpt / "model.safetensors").write_bytes(b"\x05\x00")
    refused(ckpt, "header length")


def test_truncated_and_trailing_data(ckpt):
    write(ckpt, edited(lambda h: None), DATA[:-4])
    refused(ckpt, rf"describes {len(DATA)} bytes of data, the file holds {len(DATA) - 4} \(trunc")
    write(ckpt, edited(lambda h: None), DATA + b"\0" * 4)
    refused(ckpt, rf"describes {len(DATA)} bytes of data, the file holds {len(DATA) + 4} \(trail")


def test_float_bytes_declared_as_int32(ckpt):
    """Same size, other dtype: the bytes would load as integers and be used as weights."""
    name = "model.layers.0.mlp.down_proj.weight"
    write(ckpt, edited(lambda h: h[name].__setitem__("dtype", "I32")))
    refused(
        ckpt,
        rf"model.safetensors: tensor {name} is stored as int32, but layers\.0\.w_down needs "
        r"floating-point values",
    )


def test_the_fixture_itself_loads_through_these_checks(ckpt):
    write(ckpt, edited(lambda h: None))
    loaded = load_checkpoint(ckpt, tokenizer=False)
    np.testing.assert_array_equal(
        loaded.params.lm_head, load_checkpoint(FIXTURES / "llama", tokenizer=False).params.lm_head
    )


# Shard indexes.


def sharded(directory, outside=None):
    """The fixture split into a.safetensors and b.safetensors; returns the index's weight map."""
    tensors = load_file(SOURCE)
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, str(directory / "a.safetensors"))
    save_file({n: tensors[n] for n in names[1::2]}, str(directory / "b.safetensors"))
    return {n: "ab"[i % 2] + ".safetensors" for i, n in enumerate(names)}


def index(directory, value):
    (directory / "model.safetensors.index.json").write_text(json.dumps(value))


def refused_index(directory, message: str):
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(directory, tokenizer=False)
    assert "\n" not in str(e.value)


def test_sharded_fixture_loads(ckpt):
    index(ckpt, {"weight_map": sharded(ckpt)})
    assert load_checkpoint(ckpt, tokenizer=False).cfg.vocab == 256


@pytest.mark.parametrize(
    ("case", "value", "message"),
    [
        ("index_is_a_list", [1, 2], "expected an object with a weight_map of names to files"),
        ("weight_map_is_a_list", {"weight_map": [1]}, "expected an object with a weight_map"),
        ("weight_map_empty", {"weight_map": {}}, "expected an object with a weight_map"),
        ("file_is_a_number", {"weight_map": {"x": 3}}, "tensor x maps to 3, expected a file name"),
        ("wrong_kind_of_file", {"weight_map": {"x": "a.bin"}}, "'a.bin' .* not a .safetensors"),
        ("nul_in_file_name", {"weight_map": {"x": "a\0.safetensors"}}, "is not a file inside"),
        ("file_name_too_long", {"weight_map": {"x": "a" * 300 + ".safetensors"}}, "missing shard"),
        ("path_too_long", {"weight_map": {"x": "a/" * 3000 + ".safetensors"}}, "missing shard"),
    ],
)
def test_malformed_index_is_refused(ckpt, case, value, message):
    sharded(ckpt)
    index(ckpt, value)
    refused_index(ckpt, rf"model.safetensors.index.json: .*{message}")


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_shards_outside_the_directory_are_refused_before_opening(tmp_path, how):
    """A valid shard outside the checkpoint (which the old loader read) or a system file."""
    inside = tmp_path / "ckpt"
    inside.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(FIXTURES / "llama" / name, inside / name)
    weight_map = sharded(inside)
    shutil.move(inside / "b.safetensors", tmp_path / "b.safetensors")
    target = {
        "absolute": str(tmp_path / "b.safetensors"),
        "dotdot": "../b.safetensors",
        "symlink": "b.safetensors",
    }[how]
    if how == "symlink":
        (inside / "b.safetensors").symlink_to(tmp_path / "b.safetensors")
    index(
        inside,
        {"weight_map": {n: target if f == "b.safetensors" else f for n, f in weight_map.items()}},
    )
    refused_index(inside, r"shard .*b\.safetensors' \(for .*\) is not a file inside")
    index(inside, {"weight_map": {"x": "/etc/passwd"}})
    refused_index(inside, r"shard '/etc/passwd' \(for x\) is not a file inside")


def test_tensor_in_another_shard_than_the_index_says(ckpt):
    weight_map = sharded(ckpt)
    swapped = {
        n: "b.safetensors" if f == "a.safetensors" else "a.safetensors"
        for n, f in weight_map.items()
    }
    index(ckpt, {"weight_map": swapped})
    refused_index(ckpt, r"b\.safetensors: tensor .* is here, the shard index says a\.safetensors")


def test_index_naming_a_tensor_no_shard_has(ckpt):
    index(ckpt, {"weight_map": sharded(ckpt) | {"model.ghost": "a.safetensors"}})
    refused_index(
        ckpt, rf"{ckpt}: the shard index lists tensor\(s\) found in no shard: \['model.gh"
    )


def test_index_with_a_name_twice(ckpt):
    weight_map = sharded(ckpt)
    text = json.dumps({"weight_map": weight_map})
    text = text[:-2] + f', "{FIRST}": "b.safetensors"' + "}}"
    (ckpt / "model.safetensors.index.json").write_text(text)
    refused_index(ckpt, rf"index.json: '{FIRST}' appears twice")


# A 40 GB sparse file whose header is valid: only the header is read.

SPARSE = """
import json, sys
from pathlib import Path
from slimllm.weights import load_checkpoint
from slimllm.weights.io import CheckpointError
try:
    load_checkpoint(Path(sys.argv[1]), tokenizer=False)
except CheckpointError as e:
    print(e)
"""


@pytest.mark.parametrize("how", ["tensor_of_40gb", "40gb_past_the_data"])
def test_sparse_40gb_file_is_not_read(ckpt, how):
    big = 40 << 30
    header = json.loads(json.dumps(HEADER))
    if how == "tensor_of_40gb":  # a valid header whose extra tensor covers the 40 GB
        header["model.mystery"] = {
            "dtype": "U8",
            "shape": [big],
            "data_offsets": [len(DATA), len(DATA) + big],
        }
    raw = json.dumps(header).encode()
    write(ckpt, raw)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(8 + len(raw) + len(DATA) + big)  # sparse: no blocks written
    code = f"import sys; sys.argv = ['x', {str(ckpt)!r}]\n" + SPARSE
    # The address cap must admit the library's memory map of the whole file (virtual, not read).
    run = bounded(code, seconds=2.0, address_gb=64.0)
    print(f"{how}: {run.seconds:.2f} s, {run.peak_mb:.0f} MB", file=sys.stderr)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = "unexpected tensor" if how == "tensor_of_40gb" else "(trailing bytes?)"
    assert expected in run.stdout, run.stdout
    assert run.seconds < 2.0 and run.peak_mb < 200, (run.seconds, run.peak_mb)
