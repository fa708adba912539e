"""Checkpoint files as lazy tensors: every name, dtype and shape up front, the data on demand.

A checkpoint can be several times larger as float32 than as stored, so nothing here reads a
whole file: `read_tensors` lists every tensor of a checkpoint directory (single or sharded) as a
`Lazy` handle, and `weights.convert` reads them one at a time, or a block of rows at a time,
while it encodes them. Data keeps its stored dtype; bfloat16 arrives as `ml_dtypes.bfloat16`
(the dtype JAX uses), so a bfloat16 model can stay bfloat16 without ever being float32.

safetensors files are read through the `safetensors` library, which checks the header (offsets
neither negative nor overlapping, the data covering the whole file) and memory-maps the file.
Pages of a mapped file that were read count in the process's resident memory for as long as
the file stays mapped, so every read opens the file, copies out the rows asked for and closes
it: what is resident is the copy, never the file (the header is parsed again for each read).
Keeping each file mapped for the whole load would add the checkpoint's size to the peak
(measured: 621 MiB instead of 314 MiB to load a 305 MiB bfloat16 model). The library's errors
come back as `CheckpointError` naming the file. PyTorch `.bin` files cannot be mapped:
`torch_bin` reads one tensor's storage at a time through its restricted unpickler, which never
runs code in the file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import ml_dtypes  # registers bfloat16 with NumPy, which safetensors needs to return it
import numpy as np
from safetensors import SafetensorError, safe_open

from slimllm.reference.errors import SlimllmError

# The safetensors dtypes a checkpoint tensor may have (floating point and integer buffers).
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(SlimllmError):
    """A checkpoint file or directory that cannot be read as a model."""


@dataclass(frozen=True)
class Lazy:
    """One checkpoint tensor, not read yet. `read()` returns it and `read(a, b)` its rows a:b,
    each time as a new array of the stored dtype. `by_rows`: reading rows reads only those rows
    (else `read` reads the whole tensor however few rows are asked for)."""

    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    read: Callable[..., np.ndarray] = field(repr=False, compare=False)
    by_rows: bool = False


@contextlib.contextmanager
def library_errors(path: Path) -> Iterator[None]:
    """The safetensors library's errors as a CheckpointError naming the file."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


def read_safetensors_rows(path: Path, name: str, a: int | None = None, b: int | None = None):
    """Tensor `name` of a safetensors file, or its rows a:b; the mapping closes on return."""
    with library_errors(path), safe_open(path, framework="numpy") as f:
        return f.get_tensor(name) if a is None else f.get_slice(name)[a:b]


def lazy_safetensors(path: Path) -> dict[str, Lazy]:
    """Every tensor of one .safetensors file, from its header only."""
    tensors = {}
    with library_errors(path), safe_open(path, framework="numpy") as f:
        for name in f.keys():
            info = f.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(info.get_dtype())
            if dtype is None:
                raise CheckpointError(
                    f"{path}: tensor {name} has unsupported dtype {info.get_dtype()}"
                )
            read = partial(read_safetensors_rows, path, name)
            tensors[name] = Lazy(path, name, np.dtype(dtype), tuple(info.get_shape()), read, True)
    return tensors


@contextlib.contextmanager
def lazy_torch_bin(path: Path) -> Iterator[dict[str, Lazy]]:
    """Every tensor of one PyTorch .bin file, read one storage at a time while the file is open."""
    from .torch_bin import open_torch_bin  # here: torch_pickle imports CheckpointError from us

    def whole(read, name, a=None, b=None):
        w = read(name)
        return w if a is None else w[a:b]

    with open_torch_bin(path) as (listing, read):
        yield {
            name: Lazy(path, name, dtype, shape, partial(whole, read, name))
            for name, (dtype, shape) in listing.items()
        }


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


@contextlib.contextmanager
def read_tensors(directory: Path) -> Iterator[dict[str, Lazy]]:
    """Every tensor of a checkpoint directory by name, unread, while its files are open; a name
    in two shards is an error."""
    with contextlib.ExitStack() as files:
        tensors: dict[str, Lazy] = {}
        for f in checkpoint_files(directory):
            if f.suffix == ".safetensors":
                part = lazy_safetensors(f)
            else:
                part = files.enter_context(lazy_torch_bin(f))
            for name in part:
                if name in tensors:
                    raise CheckpointError(
                        f"{f}: tensor {name} appears in more than one shard "
                        f"(also in {tensors[name].file.name})"
                    )
            tensors.update(part)
        yield tensors
