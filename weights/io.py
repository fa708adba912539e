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
come back as `CheckpointError` naming the file.

Before the library sees a file, `read_header` checks its header here, reading only the header
(at most MAX_HEADER bytes, and never past the file's end): the JSON parsed with duplicate names
refused (JSON's last-one-wins would hide one silently), every entry a known dtype, a shape of
non-negative integers and two offsets whose range is exactly shape x dtype size, and the ranges
tiling the data section from its first byte to the file's end (nothing negative, overlapping,
missing or left over). Each error names the file and the tensor. A shard index is checked
likewise (`read_index`): a weight map of names to files that stay inside the checkpoint
directory, checked before any shard is opened, and each tensor in the shard the index names.
Names and values from a file appear in messages on one line and cut short (`shown`, `named`).

PyTorch `.bin` files cannot be mapped: `torch_bin` reads one tensor's storage at a time through
its restricted unpickler, which never runs code in the file.
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

from slimllm.reference.errors import SlimllmError, clip, shown

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


# The largest header read (the safetensors library's own limit): a bigger one is refused unread.
MAX_HEADER = 100_000_000


class CheckpointError(SlimllmError):
    """A checkpoint file or directory that cannot be read as a model."""


def named(name) -> str:
    """A tensor name read from a file as a message shows it: as it is when it is printable and
    not too long, else as `shown`."""
    return (
        name if isinstance(name, str) and name.isprintable() and len(name) <= 200 else shown(name)
    )


def unique_keys(where: str):
    """A json.loads object_pairs_hook building dicts that refuses a key given twice."""

    def build(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{where}: {shown(key)} appears twice in one JSON object")
            out[key] = value
        return out

    return build


def parse_json(text: bytes, where: str):
    """The JSON in a file's bytes (UTF-8), each object's keys unique; bad UTF-8, nesting too
    deep and numbers too long to convert are errors naming `where` too."""
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=unique_keys(where))
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise CheckpointError(f"{where}: not valid JSON ({clip(str(e))})") from None


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tensor_bytes(shape: list[int], dtype, limit: int) -> int:
    """Bytes of a tensor of `shape`, or any number above `limit` once it is known to be (so
    that a shape of many huge sizes is never multiplied out)."""
    if 0 in shape:
        return 0
    count = np.dtype(dtype).itemsize
    for d in shape:
        count *= d
        if count > limit:
            break
    return count


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file, from its header only, every entry checked
    against the file's size (see the module docstring) before any data is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{path}: not a safetensors file: its header length {n} does not fit in "
                f"{size} bytes (at most {MAX_HEADER}; truncated or corrupt?)"
            )
        raw = f.read(n)
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object"
        )
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    tensors, ranges = {}, []
    for name, entry in header.items():
        where = f"{path}: tensor {named(name)}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is {shown(entry)}, expected an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{where}: dtype {shown(dtype)} is not one of {', '.join(SAFETENSORS_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(is_int(d) and 0 <= d < 2**64 for d in shape):
            raise CheckpointError(
                f"{where}: shape {shown(shape)} is not a list of sizes in [0, 2**64)"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))):
            raise CheckpointError(f"{where}: data_offsets {shown(offsets)} is not two integers")
        a, b = offsets
        nbytes = tensor_bytes(shape, SAFETENSORS_DTYPES[dtype], size)
        if not 0 <= a <= b or b - a != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {shown(offsets)} do not hold {dtype} {shown(shape)} "
                f"({nbytes if nbytes <= size else 'more than the file'} bytes)"
            )
        tensors[name] = (dtype, tuple(shape))
        ranges.append((a, b, name))
    data, end, last = size - 8 - n, 0, None
    for a, b, name in sorted(ranges):
        if a != end:
            what = f"overlaps {named(last)}" if a < end else f"leaves bytes [{end}, {a}) unused"
            raise CheckpointError(f"{path}: tensor {named(name)} at [{a}, {b}) {what}")
        end, last = b, name
    if end != data:
        raise CheckpointError(
            f"{path}: the header describes {end} bytes of data, the file holds {data} "
            f"({'truncated' if end > data else 'trailing bytes'}?)"
        )
    return tensors


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
            f"{path}: not a readable safetensors file (truncated or corrupt?): {clip(str(e), 300)}"
        ) from None


def read_safetensors_rows(path: Path, name: str, a: int | None = None, b: int | None = None):
    """Tensor `name` of a safetensors file, or its rows a:b; the mapping closes on return."""
    with library_errors(path), safe_open(path, framework="numpy") as f:
        return f.get_tensor(name) if a is None else f.get_slice(name)[a:b]


def lazy_safetensors(path: Path) -> dict[str, Lazy]:
    """Every tensor of one .safetensors file, from its header only (checked by `read_header`,
    then by the library)."""
    header = read_header(path)
    with library_errors(path), safe_open(path, framework="numpy"):
        pass
    return {
        name: Lazy(
            path,
            name,
            np.dtype(SAFETENSORS_DTYPES[dtype]),
            shape,
            partial(read_safetensors_rows, path, name),
            by_rows=True,
        )
        for name, (dtype, shape) in sorted(header.items())
    }


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


def inside(root: Path, file: str) -> bool:
    """Whether `file` names a path inside directory `root` (resolved: no link leads out)."""
    if "\0" in file or Path(file).is_absolute() or ".." in Path(file).parts:
        return False
    try:
        return (root / file).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a name too long, a link loop
        return False


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long
        return False


def read_index(directory: Path, index_name: str, suffix: str) -> dict[str, Path]:
    """tensor name -> shard file, from a `*.index.json` weight map; every shard a `suffix` file
    inside `directory` (no absolute path, no `..`, no link out), checked before any is opened."""
    path = directory / index_name
    index = parse_json(path.read_bytes(), str(path))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: expected an object with a weight_map of names to files")
    root, shards = directory.resolve(), {}
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(
                f"{path}: tensor {named(name)} maps to {shown(file)}, expected a file name"
            )
        if file in shards:
            continue
        if not inside(root, file):
            raise CheckpointError(
                f"{path}: shard {shown(file)} (for {named(name)}) is not a file inside {directory}"
            )
        if not file.endswith(suffix):
            raise CheckpointError(
                f"{path}: shard {shown(file)} (for {named(name)}) is not a {suffix} file"
            )
        shards[file] = directory / file
    missing = [f for f, p in shards.items() if not is_file(p)]
    if missing:
        raise CheckpointError(f"{path}: lists missing shard(s) {shown(missing)}")
    return {name: shards[file] for name, file in weight_map.items()}


def checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files of a checkpoint directory (safetensors preferred, else PyTorch .bin)
    and, when sharded by an index, where the index says each tensor is."""
    directory = Path(directory)
    for index, single, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        if (directory / index).exists():
            where = read_index(directory, index, Path(single).suffix)
            return list(dict.fromkeys(where.values())), where
        if (directory / single).exists():
            return [directory / single], None
        found = sorted(directory.glob(pattern))
        if found:
            return found, None
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model*.bin found")


def check_index(tensors: dict[str, Lazy], where: dict[str, Path]) -> None:
    """Each tensor of the index in the shard it names (one the index leaves out is still
    checked by `weights.convert`: used or ignored)."""
    for name, t in tensors.items():
        if name in where and where[name] != t.file:
            raise CheckpointError(
                f"{t.file}: tensor {named(name)} is here, the shard index says {where[name].name}"
            )
    absent = sorted(set(where) - set(tensors))
    if absent:
        raise CheckpointError(
            f"{where[absent[0]].parent}: the shard index lists tensor(s) found in no shard: "
            f"{shown(absent[:5])} "
            f"(first expected in {where[absent[0]]})"
        )


@contextlib.contextmanager
def read_tensors(directory: Path) -> Iterator[dict[str, Lazy]]:
    """Every tensor of a checkpoint directory by name, unread, while its files are open; a name
    in two shards is an error."""
    with contextlib.ExitStack() as files:
        tensors: dict[str, Lazy] = {}
        paths, where = checkpoint_files(directory)
        for f in paths:
            if f.suffix == ".safetensors":
                part = lazy_safetensors(f)
            else:
                part = files.enter_context(lazy_torch_bin(f))
            for name in part:
                if name in tensors:
                    raise CheckpointError(
                        f"{f}: tensor {named(name)} appears in more than one shard "
                        f"(also in {tensors[name].file.name})"
                    )
            tensors.update(part)
        if where is not None:
            check_index(tensors, where)
        yield tensors
