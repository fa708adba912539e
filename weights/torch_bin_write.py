"""Write PyTorch `pytorch_model*.bin` checkpoints without torch, in torch.save's zip layout.

A mapping of NumPy arrays becomes <folder>/data.pkl, a protocol-2 pickle of an OrderedDict of
`torch._utils._rebuild_tensor_v2` calls written opcode by opcode, plus one record per tensor
whose data is aligned as torch.save aligns it; torch.load(weights_only=True) accepts the result
and `torch_bin` reads it. Tests use it to make checkpoints.
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["write_torch_bin"]


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
