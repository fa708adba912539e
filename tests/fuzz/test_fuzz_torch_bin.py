"""Fuzzing PyTorch `.bin` checkpoints: mutated files end in a clean SlimllmError or a model that
is exactly what the file says.

Three targets, each on a small valid checkpoint written by `write_torch_bin`:
- the whole zip file, mutated byte-wise. Every record is covered by a CRC-32, so a mutation
  either leaves the model identical to the original or must be refused.
- the pickle (data.pkl), mutated and re-archived with a correct CRC, and the same pickle in the
  legacy layout. A mutated pickle may describe a different valid model (a renamed key, another
  shape of the same size), so a successful load is compared with `naive_load`: the same pickle
  unpickled the simplest way and each tensor cut from its storage bytes with NumPy, written
  here independently of the reader. For the unmutated pickle that is the original model.
Mutations: truncate, flip a byte, splice a slice elsewhere, insert bytes, write huge numbers,
and for pickles swap an opcode for another, insert deep nesting at an opcode boundary, and set
an integer (a size, stride, offset or element count) to another value, small or huge.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fuzz.harness import outcome, same
from hypothesis import given
from hypothesis import strategies as st

from slimllm.conformance.profiles import fuzzing
from slimllm.weights.torch_bin import list_torch_bin, load_torch_bin
from slimllm.weights.torch_bin_write import _p_int as p_int
from slimllm.weights.torch_bin_write import write_torch_bin

TENSORS = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
    "b": np.array([1, -2, 3, 2**40], np.int64),
    "h": np.array([0.5, -1.0, 65504.0], np.float16),
    "m": np.array([[True, False], [False, True]]),
}
HUGE = [b"\xff" * 8, b"\x7f\xff\xff\xff", b"\x00\x00\x00\x80", struct.pack("<q", 2**62), b"\0" * 8]
# opcodes that nest: a tuple, a list, marks, a memo round of t = (t, t)
DEEP = [b")" + b"\x85" * 40, b"]" * 3, b"(" * 50, b")q\x00" + b"h\x00\x86q\x00" * 40]
OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]
NUMBERS = [-1, 2**31 - 1, 2**31, 2**62, 2**64, 2**127, 2**200]
TYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.uint8,
}


@dataclass(repr=False)  # a failing example prints only its mutated bytes
class Original:
    path: Path
    raw: bytes
    records: dict[str, bytes]
    model: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    """The valid checkpoint: its path, bytes, records by name, and loaded model."""
    path = tmp_path_factory.mktemp("fuzz_torch") / "original.bin"
    write_torch_bin(path, TENSORS)
    with zipfile.ZipFile(path) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    return Original(path, path.read_bytes(), records, load_torch_bin(path, keep_dtype=True))


@st.composite
def mutated(draw, data: bytes, pickle_ops: bool) -> bytes:
    """data after one to three mutations; `pickle_ops` adds opcode swaps and deep nesting."""
    data = bytearray(data)
    ops = list(pickletools.genops(bytes(data))) if pickle_ops else []
    boundaries = [pos for _, _, pos in ops]
    # (start, end) of each integer: sizes, strides, offsets and element counts
    numbers = [(a[2], b[2]) for a, b in zip(ops, ops[1:]) if a[0].name.startswith("BININT")]
    kinds = ["truncate", "flip", "splice", "insert", "huge"]
    kinds += ["opcode", "deep", "number"] if pickle_ops else []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind in ("opcode", "deep"):
            at = min(draw(st.sampled_from(boundaries)), len(data))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "splice":
            start = draw(st.integers(0, len(data)))
            data[at:at] = data[start : draw(st.integers(start, len(data)))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "huge":
            huge = draw(st.sampled_from(HUGE))
            data[at : at + len(huge)] = huge
        elif kind == "opcode" and at < len(data):
            data[at : at + 1] = draw(st.sampled_from(OPCODES))
        elif kind == "deep":
            data[at:at] = draw(st.sampled_from(DEEP))
        elif kind == "number":
            start, end = draw(st.sampled_from(numbers))
            if end <= len(data):
                data[start:end] = p_int(draw(st.sampled_from(NUMBERS) | st.integers(0, 40)))
    return bytes(data)


class _Naive(pickle.Unpickler):
    """The pickle read the simplest way: torch's calls and storages become plain tuples."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils":
            return lambda *args: (name, args)
        assert module == "torch" and name in TYPES, (module, name)
        return name

    def persistent_load(self, pid):
        return pid


def naive_load(pkl: bytes, storages: dict[str, bytes]) -> dict[str, np.ndarray]:
    """What the pickle says, as load_torch_bin(keep_dtype=True) returns it, computed directly:
    each tensor is the strided view of its storage's bytes (no bounds checks: the reader
    accepted this pickle, so its views must be in range)."""
    out = {}
    for name, call in _Naive(io.BytesIO(pkl), encoding="utf-8").load().items():
        while call[0] != "_rebuild_tensor_v2":  # a parameter wraps its tensor
            call = call[1][0]
        (_, kind, key, _, numel), offset, shape, stride = call[1][:4]
        flat = np.frombuffer(storages[key], TYPES[kind])
        assert flat.size == numel
        if 0 in shape:
            array = np.zeros(shape, flat.dtype)
        else:
            steps = [s * flat.itemsize for s in stride]
            array = np.lib.stride_tricks.as_strided(flat[offset:], shape, steps).copy()
        if kind == "BoolStorage":
            array = array.astype(np.bool_)
        metadata = call[1][6] if len(call[1]) > 6 else None
        if metadata and metadata.get("neg"):
            array = -array
        out[name] = array
    return out


def check(path, pkl: bytes | None, storages: dict[str, bytes], original_model) -> str | None:
    """Load path both ways: a clean error, or the model the pickle describes (the original model
    when pkl is None). Listing agrees with loading on names and shapes."""
    message, model = outcome(load_torch_bin, path, keep_dtype=True)
    listed_message, listing = outcome(list_torch_bin, path)
    if model is not None:
        assert same(model, original_model if pkl is None else naive_load(pkl, storages))
        assert listing is not None
        assert {name: shape for name, (_, shape) in listing.items()} == {
            name: array.shape for name, array in model.items()
        }
    elif listing is None:
        assert listed_message is not None
    return message


@fuzzing()
@given(data=st.data())
def test_fuzz_whole_zip_file(original, data):
    target = original.path.with_name("whole.bin")
    target.write_bytes(data.draw(mutated(original.raw, pickle_ops=False)))
    check(target, None, {}, original.model)


def storages_of(records: dict[str, bytes]) -> dict[str, bytes]:
    prefix = "archive/data/"
    return {name[len(prefix) :]: data for name, data in records.items() if name.startswith(prefix)}


@fuzzing()
@given(data=st.data())
def test_fuzz_pickle_in_zip(original, data):
    records = original.records
    pkl = data.draw(mutated(records["archive/data.pkl"], pickle_ops=True))
    target = original.path.with_name("pickle.bin")
    with zipfile.ZipFile(target, "w") as archive:
        for name, record in records.items():
            archive.writestr(name, pkl if name == "archive/data.pkl" else record)
    check(target, pkl, storages_of(records), original.model)


LEGACY_HEAD = b"".join(
    pickle.dumps(value, protocol=2)
    for value in (
        0x1950A86A20F9469CFC6C,
        1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}},
    )
)


@fuzzing()
@given(data=st.data())
def test_fuzz_pickle_in_legacy_layout(original, data):
    pkl = data.draw(mutated(original.records["archive/data.pkl"], pickle_ops=True))
    storages = storages_of(original.records)
    keys = sorted(storages)
    # each storage: its element count, then its bytes (the writer keys them 0, 1, ... in order)
    sizes = {str(i): array.size for i, array in enumerate(TENSORS.values())}
    tail = b"".join(struct.pack("<q", sizes[k]) + storages[k] for k in keys)
    target = original.path.with_name("legacy.bin")
    target.write_bytes(LEGACY_HEAD + pkl + pickle.dumps(keys, protocol=2) + tail)
    check(target, pkl, storages, original.model)


def test_the_oracle_reads_the_original_as_the_reader_does(original):
    records, model = original.records, original.model
    assert same(naive_load(records["archive/data.pkl"], storages_of(records)), model)
    assert same(model, {name: np.asarray(array) for name, array in TENSORS.items()})
