"""Reading checkpoint files into NumPy: safetensors (single or sharded) and PyTorch `.bin`.

safetensors files are parsed here directly (an 8-byte header length, a JSON header, raw data)
rather than through `safetensors.numpy`, for two reasons: NumPy has no bfloat16, which we widen
to float32 bit-exactly, and a truncated or inconsistent file must fail with a message naming
the file and the tensor. PyTorch `.bin` files go through `torch_bin`, whose restricted
unpickler (`torch_pickle`) never executes code. Half-precision tensors load as float32 for the
reference.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 below
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as a model."""


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file; floating point widened to float32."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise CheckpointError(f"{path}: header claims {n} bytes but the file is truncated")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}"
            )
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > len(body):
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {end} but the data holds {len(body)} bytes "
                "(truncated file?)"
            )
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name} size does not match its shape {shape}")
        a = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        out[name] = bf16_to_f32(a) if info["dtype"] == "BF16" else to_float32(a).copy()
    return out


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    from .torch_bin import load_torch_bin  # here: torch_pickle imports CheckpointError from us

    return {k: to_float32(v) for k, v in load_torch_bin(path).items()}


def read_index(directory: Path, index_name: str) -> list[Path]:
    """Shard files listed by a `*.index.json` weight map, each once, in order of appearance."""
    index = json.loads((directory / index_name).read_text())
    files = list(dict.fromkeys(index.get("weight_map", {}).values()))
    missing = [f for f in files if not (directory / f).exists()]
    if missing:
        raise CheckpointError(f"{directory}: {index_name} lists missing shard(s) {missing}")
    return [directory / f for f in files]


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors preferred, else PyTorch .bin."""
    directory = Path(directory)
    for index, single, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        if (directory / index).exists():
            return read_index(directory, index)
        if (directory / single).exists():
            return [directory / single]
        found = sorted(directory.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model*.bin found")


def read_tensors(directory: Path, progress=None) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory by name; a name in two shards is an error."""
    tensors: dict[str, np.ndarray] = {}
    files = checkpoint_files(directory)
    for f in progress(files) if progress else files:
        part = read_safetensors(f) if f.suffix == ".safetensors" else read_torch_bin(f)
        for name in part:
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name} appears in more than one shard")
        tensors.update(part)
    return tensors
