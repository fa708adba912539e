"""Read and write PyTorch `pytorch_model*.bin` checkpoints without torch and without running code.

torch.save pickles the state dict, and loading an arbitrary pickle can execute arbitrary code.
Here the pickle is read by a restricted unpickler: it resolves only the globals torch uses to
rebuild plain tensors (plus `collections.OrderedDict` and the typed storage classes), and each
of those resolves to a local stand-in that merely records storage key, offset, shape and stride.
Any other global stops the load with `UnsafePickleError` before anything runs. The tensor bytes
are then read from the archive with NumPy. Both the zip layout torch.save writes since 1.6 and
the older single-stream ("legacy") layout are read. `write_torch_bin` writes the zip layout
without torch, so tests can make checkpoints that torch.load(weights_only=True) also accepts.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .io import CheckpointError

__all__ = [
    "TorchBinError",
    "UnsafePickleError",
    "list_torch_bin",
    "load_torch_bin",
    "write_torch_bin",
]


class TorchBinError(CheckpointError):
    """A file that cannot be read as a PyTorch checkpoint of plain tensors."""


class UnsafePickleError(TorchBinError):
    """The checkpoint's pickle names a global outside the tensor-rebuilding allowlist."""


# --- what the pickle may contain --------------------------------------------------------------


class _Sealed:
    """Base of the objects the unpickler hands out: a pickle may not change them.

    BUILD sets state through __setstate__, and these objects are shared between loads or
    trusted for sizes later, so one file must not be able to alter them.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TorchBinError(f"the pickle tries to change a {type(self).__name__.lstrip('_')}")


# Not slots=True: that makes dataclasses generate a __setstate__ which ignores frozen.
@dataclass(frozen=True)
class _StorageType(_Sealed):
    name: str  # torch class name, e.g. "FloatStorage"
    dtype: str  # dtype name of the stored values, e.g. "bfloat16"
    raw: np.dtype  # how the bytes are read: bfloat16 as its uint16 bits, bool as uint8


_STORAGE_TYPES = {
    t.name: t
    for t in (
        _StorageType("FloatStorage", "float32", np.dtype(np.float32)),
        _StorageType("HalfStorage", "float16", np.dtype(np.float16)),
        _StorageType("BFloat16Storage", "bfloat16", np.dtype(np.uint16)),
        _StorageType("DoubleStorage", "float64", np.dtype(np.float64)),
        _StorageType("LongStorage", "int64", np.dtype(np.int64)),
        _StorageType("IntStorage", "int32", np.dtype(np.int32)),
        _StorageType("ShortStorage", "int16", np.dtype(np.int16)),
        _StorageType("CharStorage", "int8", np.dtype(np.int8)),
        _StorageType("ByteStorage", "uint8", np.dtype(np.uint8)),
        _StorageType("BoolStorage", "bool", np.dtype(np.uint8)),
    )
}


@dataclass(frozen=True)
class _StorageRef(_Sealed):
    key: str
    type: _StorageType
    numel: int


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    negate: bool  # torch's lazy "neg" bit: the stored values are the negated tensor


@dataclass(frozen=True)
class _StandIn(_Sealed):
    """What an allowed function global resolves to: calls a local function, immutably."""

    func: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.func(*args)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(_is_int(v) and v >= 0 for v in value):
        raise TorchBinError(f"tensor {what} {value!r} is not a tuple of non-negative integers")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for torch._utils._rebuild_tensor_v2: the view, checked against its storage."""
    if not isinstance(storage, _StorageRef):
        raise TorchBinError(f"tensor storage is {type(storage).__name__}, not a storage reference")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise TorchBinError(f"tensor storage offset {storage_offset!r} is not a non-negative int")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise TorchBinError(f"tensor size {shape} and stride {strides} differ in length")
    negate = False
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
            raise TorchBinError(f"unsupported tensor metadata {metadata!r}")
        if metadata.get("conj"):
            raise TorchBinError("tensor has the conjugate bit set; complex tensors are unsupported")
        negate = bool(metadata.get("neg"))
        if negate and storage.type.dtype == "bool":
            raise TorchBinError("a bool tensor cannot have the negation bit set")
    # as_strided trusts its arguments, so an out-of-range view must be refused here
    if 0 not in shape:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise TorchBinError(
                f"tensor view (offset {storage_offset}, size {shape}, stride {strides}) reaches "
                f"element {last} of storage {storage.key!r}, which holds {storage.numel}"
            )
    return _TensorRef(storage, storage_offset, shape, strides, negate)


def _rebuild_parameter(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None
) -> Any:
    """Stand-in for torch._utils._rebuild_parameter(_with_state): a parameter is its tensor."""
    if not isinstance(data, _TensorRef):
        raise TorchBinError(f"parameter data is {type(data).__name__}, not a tensor")
    return data


_ALLOWED_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _StandIn(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _StandIn(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _StandIn(_rebuild_parameter),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only the tensor-rebuilding globals; storages become _StorageRef."""

    def __init__(self, file: BinaryIO):
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[module, name]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        why = "only plain tensors in a mapping may appear in a checkpoint"
        if (module == "torch" and name.endswith("Storage")) or module == "torch._utils":
            # torch's own, and harmless, but for tensor kinds this reader does not handle
            why = "it builds a tensor type this reader does not support (complex, uint16, ...)"
        raise UnsafePickleError(
            f"pickle references forbidden global {module}.{name}: {why}; "
            "refused before anything ran"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        # zip layout: ('storage', type, key, location, numel); legacy appends view metadata
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise TorchBinError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, location, numel = pid[:5]
        if len(pid) == 6 and pid[5] is not None:
            raise TorchBinError("storage views (torch < 1.0 checkpoints) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise TorchBinError(f"persistent id names {storage_type!r}, not a storage type")
        if not isinstance(key, str) or not isinstance(location, str):
            raise TorchBinError(f"storage key {key!r} or location {location!r} is not a string")
        if not _is_int(numel) or numel < 0:
            raise TorchBinError(f"storage {key!r} has invalid element count {numel!r}")
        ref = _StorageRef(key, storage_type, numel)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise TorchBinError(f"storage {key!r} is declared twice with different types or sizes")
        return known


def _unpickle(file: BinaryIO, what: str) -> tuple[Any, dict[str, _StorageRef]]:
    """Load one pickle from file with the restricted unpickler: (object, storages it named)."""
    unpickler = _RestrictedUnpickler(file)
    try:
        return unpickler.load(), unpickler.storages
    except TorchBinError:
        raise
    except Exception as exc:  # whatever decoding untrusted bytes raises means the file is bad
        raise TorchBinError(
            f"{what} is not a valid pickle (corrupt or truncated file?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _state_dict(root: Any) -> dict[str, _TensorRef]:
    """The pickled object as name -> tensor, or a clear error for any other structure."""
    if not isinstance(root, dict):
        kind = (
            "a tensor"
            if isinstance(root, _TensorRef)
            else f"an object of type {type(root).__name__}"
        )
        raise TorchBinError(
            f"the checkpoint holds {kind}; expected a mapping of names to tensors (a state_dict)"
        )
    for name, value in root.items():
        if not isinstance(name, str):
            raise TorchBinError(f"the checkpoint has a non-string key {name!r}")
        if not isinstance(value, _TensorRef):
            hint = ""
            if isinstance(value, dict):
                hint = " (a nested checkpoint? save model.state_dict() itself)"
            raise TorchBinError(
                f"entry {name!r} is of type {type(value).__name__}, not a tensor{hint}"
            )
    return dict(root)


# --- the two file layouts ---------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_CHUNK = 1 << 24
# what zipfile raises on damaged archives (bad offsets surface as ValueError or struct.error)
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error)


def _read_into(file: BinaryIO, out: np.ndarray, what: str) -> None:
    """Fill out's bytes from file, in chunks so no second full-size copy is made."""
    buf = memoryview(out).cast("B")
    pos = 0
    while pos < len(buf):
        got = file.readinto(buf[pos : pos + _CHUNK])
        if not got:
            raise TorchBinError(f"{what} ends after {pos} of {len(buf)} bytes (truncated file?)")
        pos += got


class _ZipCheckpoint:
    """The layout torch.save writes since 1.6: <folder>/data.pkl plus <folder>/data/<key>."""

    def __init__(self, file: BinaryIO):
        try:
            self._zip = zipfile.ZipFile(file)
        except _ZIP_ERRORS as exc:
            raise TorchBinError(
                f"not a readable zip archive (truncated or corrupt?): {exc}"
            ) from exc
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchBinError(
                f"zip archive has {len(pickles)} <folder>/data.pkl records, expected 1; "
                "not a torch.save checkpoint"
            )
        self._prefix = pickles[0].removesuffix("data.pkl")
        byteorder = b"little"  # files from before the record existed were little-endian
        if self._prefix + "byteorder" in self._zip.namelist():
            byteorder = self._read(self._prefix + "byteorder").strip()
        if byteorder not in (b"little", b"big"):
            raise TorchBinError(f"unknown byteorder record {byteorder!r}")
        self._swap = (byteorder == b"little") != np.little_endian
        root, _ = _unpickle(io.BytesIO(self._read(pickles[0])), pickles[0])
        self.tensors = _state_dict(root)

    def _read(self, name: str) -> bytes:
        try:
            return self._zip.read(name)
        except _ZIP_ERRORS as exc:
            raise TorchBinError(f"record {name} is unreadable (corrupt file?): {exc}") from exc

    def read_storage(self, ref: _StorageRef) -> np.ndarray:
        name = f"{self._prefix}data/{ref.key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise TorchBinError(f"storage record {name} is missing") from None
        expected = ref.numel * ref.type.raw.itemsize
        if info.file_size != expected:
            raise TorchBinError(
                f"storage record {name} holds {info.file_size} bytes, but the pickle declares "
                f"{ref.numel} {ref.type.dtype} values ({expected} bytes)"
            )
        out = np.empty(ref.numel, ref.type.raw)
        try:
            with self._zip.open(info) as record:
                _read_into(record, out, f"storage record {name}")
        except TorchBinError:
            raise
        except _ZIP_ERRORS as exc:
            raise TorchBinError(
                f"storage record {name} is unreadable (corrupt file?): {exc}"
            ) from exc
        return out.byteswap(inplace=True) if self._swap else out


class _LegacyCheckpoint:
    """torch.save's layout before 1.6: header pickles, the object pickle, then raw storages."""

    def __init__(self, file: BinaryIO):
        self._file = file
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
        if _unpickle(file, "the legacy magic number")[0] != _LEGACY_MAGIC:
            raise TorchBinError("not a PyTorch checkpoint: a pickle without torch's magic number")
        protocol = _unpickle(file, "the legacy protocol version")[0]
        if protocol != _LEGACY_PROTOCOL:
            raise TorchBinError(f"unsupported legacy protocol version {protocol!r}")
        sys_info = _unpickle(file, "the legacy system info")[0]
        if not isinstance(sys_info, dict):
            raise TorchBinError(f"legacy system info is a {type(sys_info).__name__}, not a dict")
        little = bool(sys_info.get("little_endian", True))
        self._swap = little != np.little_endian
        root, storages = _unpickle(file, "the legacy object pickle")
        self.tensors = _state_dict(root)
        keys = _unpickle(file, "the legacy storage key list")[0]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchBinError(f"the legacy storage key list is not a list of strings: {keys!r}")
        if set(keys) != set(storages):
            raise TorchBinError("the legacy storage key list does not match the storages used")
        # Each storage follows in key order as an int64 element count and then its bytes.
        self._offsets: dict[str, int] = {}
        for key in keys:
            ref = storages[key]
            header = file.read(8)
            if len(header) != 8:
                raise TorchBinError(f"storage {key!r} is missing (truncated file?)")
            (numel,) = struct.unpack("<q" if little else ">q", header)
            end = file.tell() + ref.numel * ref.type.raw.itemsize
            if numel != ref.numel or end > size:
                raise TorchBinError(f"storage {key!r} is truncated or its size does not match")
            self._offsets[key] = file.tell()
            file.seek(end)

    def read_storage(self, ref: _StorageRef) -> np.ndarray:
        out = np.empty(ref.numel, ref.type.raw)
        self._file.seek(self._offsets[ref.key])
        _read_into(self._file, out, f"storage {ref.key!r}")
        return out.byteswap(inplace=True) if self._swap else out


def _open_checkpoint(file: BinaryIO) -> _ZipCheckpoint | _LegacyCheckpoint:
    head = file.read(4)
    file.seek(0)
    if head.startswith(b"PK"):
        return _ZipCheckpoint(file)
    if head.startswith(b"\x80"):  # a pickle protocol marker: torch.save before 1.6
        return _LegacyCheckpoint(file)
    if not head:
        raise TorchBinError("the file is empty")
    raise TorchBinError(
        f"not a PyTorch checkpoint: it starts with {head!r}, neither a zip archive nor a pickle"
    )


@contextlib.contextmanager
def _naming_errors(path: Path) -> Iterator[None]:
    """Prefix the file name to any TorchBinError raised inside the block."""
    try:
        yield
    except TorchBinError as exc:
        raise type(exc)(f"{path}: {exc}") from exc.__cause__


# --- public reading ---------------------------------------------------------------------------


def list_torch_bin(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's stored dtype name ("float32", "bfloat16", ...) and shape, from the pickle only.

    No tensor data is read, so this is cheap on large files; the pickle is vetted as in loading.
    """
    path = Path(path)
    with _naming_errors(path), open(path, "rb") as file:
        tensors = _open_checkpoint(file).tensors
    return {name: (ref.storage.type.dtype, ref.shape) for name, ref in tensors.items()}


def load_torch_bin(path: str | Path, *, keep_dtype: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a torch.save checkpoint as name -> C-contiguous, writable NumPy array.

    float16 and bfloat16 are widened to float32 exactly; keep_dtype keeps float16 (NumPy has no
    bfloat16, so that always widens). Other dtypes load as stored. Nothing in the file is run.
    """
    path = Path(path)
    with _naming_errors(path), open(path, "rb") as file:
        checkpoint = _open_checkpoint(file)
        # Storages are read one at a time, and dropped once every tensor on them is built, so
        # peak memory is the result plus one storage.
        by_storage: dict[str, list[str]] = {}
        for name, ref in checkpoint.tensors.items():
            by_storage.setdefault(ref.storage.key, []).append(name)
        arrays: dict[str, np.ndarray] = {}
        for names in by_storage.values():
            storage = checkpoint.read_storage(checkpoint.tensors[names[0]].storage)
            for name in names:
                arrays[name] = _build(
                    storage, checkpoint.tensors[name], len(names) == 1, keep_dtype
                )
    return {name: arrays[name] for name in checkpoint.tensors}


def _build(storage: np.ndarray, ref: _TensorRef, sole_user: bool, keep_dtype: bool) -> np.ndarray:
    """One tensor from its storage: the strided view, copied unless it is the whole storage."""
    if 0 in ref.shape:
        array = np.empty(ref.shape, storage.dtype)
    else:
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * storage.itemsize for s in ref.stride),
            writeable=False,
        )
        whole = ref.offset == 0 and view.size == storage.size and view.flags.c_contiguous
        # A sole tensor spanning its storage exactly can own it; anything else is copied so it
        # neither aliases another tensor nor keeps a larger storage alive.
        array = storage.reshape(ref.shape) if sole_user and whole else np.array(view, order="C")
    kind = ref.storage.type.dtype
    # astype and in-place operators, because NumPy operators turn 0-d arrays into scalars
    if kind == "bfloat16":
        bits = array.astype(np.uint32)
        bits <<= 16
        array = bits.view(np.float32)
    elif kind == "float16" and not keep_dtype:
        array = array.astype(np.float32)
    elif kind == "bool":
        array = array.astype(np.bool_)
    if ref.negate:
        np.negative(array, out=array)
    return array


# --- writing ----------------------------------------------------------------------------------

_WRITE_TYPES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
_ALIGN = 64  # torch pads each record's data to this boundary (so it could mmap them)
_ZIP64_ABOVE = 1 << 30  # force zip64 past this size so the local header length is known ahead


def write_torch_bin(
    path: str | Path, tensors: Mapping[str, np.ndarray], *, bf16_from_float32: bool = False
) -> None:
    """Write tensors in torch.save's zip layout (readable by torch.load(weights_only=True)).

    bf16_from_float32 stores float32 arrays as bfloat16, rounded to nearest even.
    """
    records = []
    for index, (name, value) in enumerate(tensors.items()):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        array = np.asarray(value)
        if bf16_from_float32 and array.dtype == np.float32:
            data, storage = _float32_to_bf16_bits(array), "BFloat16Storage"
        elif array.dtype.newbyteorder("=") in _WRITE_TYPES:
            storage = _WRITE_TYPES[array.dtype.newbyteorder("=")]
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        else:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which cannot be written")
        records.append((name, storage, str(index), array.shape, data))
    with open(path, "wb") as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        _write_record(file, archive, "archive/data.pkl", _state_dict_pickle(records))
        _write_record(file, archive, "archive/.format_version", b"1")
        _write_record(file, archive, "archive/.storage_alignment", str(_ALIGN).encode())
        _write_record(file, archive, "archive/byteorder", b"little")
        for _, _, key, _, data in records:
            _write_record(file, archive, f"archive/data/{key}", data.reshape(-1).view(np.uint8))
        _write_record(file, archive, "archive/version", b"3\n")


def _float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even; NaN becomes torch's 0x7FC0."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(array), 0x7FC0, rounded).astype("<u2")


def _write_record(file: BinaryIO, archive: zipfile.ZipFile, name: str, data: Any) -> None:
    """One uncompressed zip entry whose data starts on an _ALIGN boundary, as torch's are."""
    nbytes = memoryview(data).nbytes
    zip64 = nbytes > _ZIP64_ABOVE
    # local header: 30 fixed bytes, the name, our padding field, and zipfile's zip64 field
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -(file.tell() + header) % _ALIGN
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad  # torch's padding field, id "FB"
    with archive.open(info, "w", force_zip64=zip64) as record:
        record.write(data)


# Pickle opcodes are written by hand: the globals must name torch functions and classes, which
# a normal Pickler can only emit by importing them.


def _p_int(value: int) -> bytes:
    if 0 <= value < 1 << 8:
        return pickle.BININT1 + struct.pack("<B", value)
    if 0 <= value < 1 << 16:
        return pickle.BININT2 + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return pickle.BININT + struct.pack("<i", value)
    size = (value.bit_length() + 8) // 8  # room for the sign bit
    return pickle.LONG1 + struct.pack("<B", size) + value.to_bytes(size, "little", signed=True)


def _p_str(value: str) -> bytes:
    encoded = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded


def _p_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _p_tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE if items else pickle.EMPTY_TUPLE


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    # torch counts empty dimensions as 1 here, so (2, 0, 3) has strides (3, 3, 1)
    return [math.prod(max(n, 1) for n in shape[i + 1 :]) for i in range(len(shape))]


def _state_dict_pickle(records: list[tuple[str, str, str, tuple[int, ...], np.ndarray]]) -> bytes:
    """Protocol-2 pickle of an OrderedDict name -> _rebuild_tensor_v2(storage, 0, shape, ...)."""
    new_ordered_dict = _p_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    parts = [pickle.PROTO + b"\x02", new_ordered_dict]
    if records:
        parts.append(pickle.MARK)
    for name, storage, key, shape, data in records:
        persistent_id = _p_tuple(
            [
                _p_str("storage"),
                _p_global("torch", storage),
                _p_str(key),
                _p_str("cpu"),  # location
                _p_int(data.size),  # element count
            ]
        )
        args = _p_tuple(
            [
                persistent_id + pickle.BINPERSID,
                _p_int(0),
                _p_tuple([_p_int(n) for n in shape]),
                _p_tuple([_p_int(s) for s in _contiguous_strides(shape)]),
                pickle.NEWFALSE,  # requires_grad
                new_ordered_dict,  # backward hooks
            ]
        )
        parts += [
            _p_str(name),
            _p_global("torch._utils", "_rebuild_tensor_v2"),
            args,
            pickle.REDUCE,
        ]
    if records:
        parts.append(pickle.SETITEMS)
    parts.append(pickle.STOP)
    return b"".join(parts)
