"""Read PyTorch `pytorch_model*.bin` checkpoints without torch and without running code.

The pickle inside is vetted by `torch_pickle`'s restricted unpickler, which hands back only
references to storages (key, dtype, element count) and tensor views on them; nothing in the file
is executed. This module opens the two layouts torch.save writes, the zip archive since 1.6
(<folder>/data.pkl plus one record per storage) and the older single stream ("legacy": header
pickles, the object pickle, then the raw storages), checks each storage's size against the
pickle, and reads the tensor bytes with NumPy into strided views, all at once (`load_torch_bin`)
or one tensor per call while the file stays open (`open_torch_bin`, for loading a model without
holding the whole file in memory). `torch_bin_write` writes the zip layout without torch, so
tests can make checkpoints that torch.load(weights_only=True) also accepts.

Sizes come from the file, so each is checked against the file before memory is allocated: no
read of the zip structure exceeds MAX_READ bytes at once (a central directory declaring 40 GB
is refused, not read), a record must lie inside the archive, storage records must be stored
uncompressed as torch.save writes them (a compressed one could inflate far beyond the file),
the pickle record is at most MAX_PICKLE_BYTES, and a legacy file must end where its last
storage does. So memory holds at most the file's pickle and the tensors returned.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

# The errors are defined beside the unpickler that raises most of them, and re-exported here as
# the errors of this module's two public functions.
from slimllm.reference.errors import clip, shown

from .torch_pickle import (
    MAX_PICKLE_BYTES,
    StorageRef,
    TensorRef,
    TorchBinError,
    UnsafePickleError,
    state_dict,
    unpickle,
)

__all__ = [
    "TorchBinError",
    "UnsafePickleError",
    "list_torch_bin",
    "load_torch_bin",
    "open_torch_bin",
]


# --- the two file layouts ---------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_CHUNK = 1 << 24
MAX_READ = 1 << 26  # the largest single read of the zip structure (a chunk is 16 MiB)
# what zipfile raises on damaged archives (bad offsets surface as ValueError or struct.error,
# damaged deflate data as zlib.error, a version or method field it does not know as
# NotImplementedError)
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
    NotImplementedError,
)


def _read_into(file: BinaryIO, out: np.ndarray, what: str) -> None:
    """Fill out's bytes from file, in chunks so no second full-size copy is made."""
    buf = memoryview(out).cast("B")
    pos = 0
    while pos < len(buf):
        got = file.readinto(buf[pos : pos + _CHUNK])
        if not got:
            raise TorchBinError(f"{what} ends after {pos} of {len(buf)} bytes (truncated file?)")
        pos += got


class _CappedFile:
    """A file whose reads are bounded: zipfile reads a whole central directory, whatever size
    the archive declares, in one call."""

    def __init__(self, file: BinaryIO, size: int):
        self._file, self._size = file, size

    def read(self, n: int | None = -1) -> bytes:
        left = max(self._size - self._file.tell(), 0)
        n = left if n is None or n < 0 else min(n, left)
        if n > MAX_READ:
            raise TorchBinError(f"the zip structure asks to read {n} bytes at once")
        return self._file.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return True


class _ZipCheckpoint:
    """The layout torch.save writes since 1.6: <folder>/data.pkl plus <folder>/data/<key>."""

    def __init__(self, file: BinaryIO):
        self._size = file.seek(0, io.SEEK_END)
        file.seek(0)
        try:
            self._zip = zipfile.ZipFile(_CappedFile(file, self._size))
        except _ZIP_ERRORS as exc:
            raise TorchBinError(
                f"not a readable zip archive (truncated or corrupt?): {clip(str(exc))}"
            ) from exc
        names = self._zip.namelist()
        if len(set(names)) != len(names):
            raise TorchBinError("the zip archive names a record twice")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchBinError(
                f"zip archive has {len(pickles)} <folder>/data.pkl records, expected 1; "
                "not a torch.save checkpoint"
            )
        self._prefix = pickles[0].removesuffix("data.pkl")
        byteorder = b"little"  # files from before the record existed were little-endian
        if self._prefix + "byteorder" in names:
            byteorder = self._read(self._prefix + "byteorder", 16).strip()
        if byteorder not in (b"little", b"big"):
            raise TorchBinError(f"unknown byteorder record {shown(byteorder)}")
        self._swap = (byteorder == b"little") != np.little_endian
        root, _, _ = unpickle(self._read(pickles[0], MAX_PICKLE_BYTES), pickles[0])
        self.tensors = state_dict(root)

    def _info(self, name: str, most: int, limit: str) -> zipfile.ZipInfo:
        """The record's entry, once its sizes fit the archive and `most` (named by `limit`)."""
        info = self._zip.getinfo(name)
        if info.header_offset + info.compress_size > self._size:
            raise TorchBinError(
                f"record {clip(name)} declares {info.compress_size} bytes at offset "
                f"{info.header_offset}, past the end of the {self._size}-byte file"
            )
        if info.file_size > most:
            raise TorchBinError(
                f"record {clip(name)} declares {info.file_size} bytes, more than {limit} ({most})"
            )
        if info.flag_bits & 1:
            raise TorchBinError(f"record {clip(name)} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise TorchBinError(
                f"record {clip(name)} uses compression method {info.compress_type}; "
                "torch.save stores records uncompressed"
            )
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and info.file_size != info.compress_size:
            raise TorchBinError(
                f"record {clip(name)} is stored uncompressed but declares {info.file_size} bytes "
                f"and holds {info.compress_size}"
            )
        return info

    def _read(self, name: str, most: int) -> bytes:
        info = self._info(name, most, "a record of its kind may hold")
        try:
            return self._zip.read(info)
        except _ZIP_ERRORS as exc:
            raise TorchBinError(
                f"record {clip(name)} is unreadable (corrupt file?): {clip(str(exc))}"
            ) from exc

    def read_storage(self, ref: StorageRef) -> np.ndarray:
        name = f"{self._prefix}data/{ref.key}"
        shown = clip(name)  # the key comes from the file
        expected = ref.numel * ref.type.raw.itemsize
        try:
            info = self._info(name, self._size, "the file's size")
        except KeyError:
            raise TorchBinError(f"storage record {shown} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED:
            # torch.save never compresses; a compressed record could inflate past the file
            raise TorchBinError(f"storage record {shown} is compressed, not stored")
        if info.file_size != expected:
            raise TorchBinError(
                f"storage record {shown} holds {info.file_size} bytes, but the pickle "
                f"declares {ref.numel} {ref.type.dtype} values ({expected} bytes)"
            )
        out = np.empty(ref.numel, ref.type.raw)
        try:
            with self._zip.open(info) as record:
                _read_into(record, out, f"storage record {shown}")
        except TorchBinError:
            raise
        except _ZIP_ERRORS as exc:
            raise TorchBinError(
                f"storage record {shown} is unreadable (corrupt file?): {clip(str(exc))}"
            ) from exc
        return out.byteswap(inplace=True) if self._swap else out


class _LegacyCheckpoint:
    """torch.save's layout before 1.6: header pickles, the object pickle, then raw storages."""

    def __init__(self, file: BinaryIO):
        self._file = file
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
        # the five pickles come first; at most MAX_PICKLE_BYTES of the file is read to find them
        head = file.read(min(size, MAX_PICKLE_BYTES))
        at = 0

        def next_pickle(what: str):
            nonlocal at
            value, storages, at = unpickle(head, what, at)
            return value, storages

        if next_pickle("the legacy magic number")[0] != _LEGACY_MAGIC:
            raise TorchBinError("not a PyTorch checkpoint: a pickle without torch's magic number")
        protocol = next_pickle("the legacy protocol version")[0]
        if protocol != _LEGACY_PROTOCOL:
            raise TorchBinError(f"unsupported legacy protocol version {shown(protocol)}")
        sys_info = next_pickle("the legacy system info")[0]
        if not isinstance(sys_info, dict):
            raise TorchBinError(f"legacy system info is a {type(sys_info).__name__}, not a dict")
        little = bool(sys_info.get("little_endian", True))
        self._swap = little != np.little_endian
        root, storages = next_pickle("the legacy object pickle")
        self.tensors = state_dict(root)
        keys = next_pickle("the legacy storage key list")[0]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchBinError(
                f"the legacy storage key list is not a list of strings: {shown(keys)}"
            )
        if set(keys) != set(storages) or len(keys) != len(storages):
            raise TorchBinError("the legacy storage key list does not match the storages used")
        # Each storage follows in key order as an int64 element count and then its bytes.
        self._offsets: dict[str, int] = {}
        file.seek(at)
        for key in keys:
            ref = storages[key]
            header = file.read(8)
            if len(header) != 8:
                raise TorchBinError(f"storage {shown(key)} is missing (truncated file?)")
            (numel,) = struct.unpack("<q" if little else ">q", header)
            end = file.tell() + ref.numel * ref.type.raw.itemsize
            if numel != ref.numel or end > size:
                raise TorchBinError(f"storage {shown(key)} is truncated or its size does not match")
            self._offsets[key] = file.tell()
            file.seek(end)
        if file.tell() != size:
            raise TorchBinError(
                f"{size - file.tell()} bytes follow the last storage, where torch.save's file ends"
            )

    def read_storage(self, ref: StorageRef) -> np.ndarray:
        out = np.empty(ref.numel, ref.type.raw)
        self._file.seek(self._offsets[ref.key])
        _read_into(self._file, out, f"storage {shown(ref.key)}")
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


@contextlib.contextmanager
def open_torch_bin(
    path: str | Path,
) -> Iterator[tuple[dict[str, tuple[np.dtype, tuple[int, ...]]], Callable[[str], np.ndarray]]]:
    """While the file is open: each tensor's NumPy dtype and shape, and a function reading one
    tensor by name in its stored dtype (bfloat16 as `ml_dtypes.bfloat16`).

    Each call reads the tensor's storage anew, so memory holds only the tensors the caller
    keeps (a storage shared by several tensors is read once per tensor).
    """
    path = Path(path)
    with open(path, "rb") as file:
        with _naming_errors(path):
            checkpoint = _open_checkpoint(file)

        def read(name: str) -> np.ndarray:
            ref = checkpoint.tensors[name]
            with _naming_errors(path):
                storage = checkpoint.read_storage(ref.storage)
            return _build(storage, ref, sole_user=True, keep_dtype=True, bfloat16=True)

        listing = {
            name: (_numpy_dtype(ref.storage.type), ref.shape)
            for name, ref in checkpoint.tensors.items()
        }
        yield listing, read


def _numpy_dtype(storage_type) -> np.dtype:
    """The NumPy dtype `open_torch_bin` returns a storage type's tensors in."""
    if storage_type.dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.bool_) if storage_type.dtype == "bool" else storage_type.raw


def _build(
    storage: np.ndarray, ref: TensorRef, sole_user: bool, keep_dtype: bool, bfloat16: bool = False
) -> np.ndarray:
    """One tensor from its storage: the strided view, copied unless it is the whole storage.
    `bfloat16`: a bfloat16 tensor comes back as `ml_dtypes.bfloat16` rather than widened."""
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
    if kind == "bfloat16" and bfloat16:
        array = array.view(ml_dtypes.bfloat16)
    elif kind == "bfloat16":
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
