"""Encoding one checkpoint tensor in a weight format with a fixed amount of memory beside it.

`encode_rows` applies `reference.weight_format.encode` to a block of rows at a time, BLOCK
bytes as float32, and writes each block into the result's arrays: besides the result, memory
holds one block read from the file, its float32 widening and the quantiser's temporaries (about
four float32 arrays of the block's size), at most about 6 x BLOCK = 24 MiB whatever the
tensor's size. A tensor is read block by block straight from its file when the file can give
part of a tensor (safetensors, llama2.c); a PyTorch .bin tensor is read whole first, in its
stored dtype. bfloat16 to bfloat16 copies bits and never makes float32.

Rows are the checkpoint's: torch's layout, [out, in] for Linear weights, which is the stored
layout of a `Compact` (one scale per output row), so a block of rows encodes as it is; a
float32 weight is written into the reference's [in, out] layout, a block of columns at a time.

A weight must be finite: NaN or Inf in a checkpoint loads without complaint otherwise and makes
every logit NaN (greedy decoding then emits token 0 forever). So each block is checked while it
is in memory, before it is encoded (no second pass over the file), and a tensor holding any
non-finite value is a `CheckpointError` naming it and how many values are NaN or Inf, and so
is a finite value the format cannot hold (float32 1e5 as float16 would be Inf). Both
Hugging Face checkpoints (`weights.convert`) and llama2.c files (`weights.llama2c`) come here.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from slimllm.reference.weight_format import (
    TRANSPOSED,
    Compact,
    WeightFormat,
    encode,
    encoding_of,
)

from .io import CheckpointError, Lazy

BLOCK = 4 << 20  # bytes of float32 encoded at once


def field(target: str) -> str:
    """The Params field of a canonical name: "layers.3.wq" -> "wq"."""
    return target.rsplit(".", 1)[-1]


def torch_to_ours(target: str, w):
    """torch Linear weights are [out, in]; ours are [in, out] (a view; it is its own inverse).
    Tables and vectors are unchanged."""
    return w.T if w.ndim == 2 and field(target) in TRANSPOSED else w


def whole(source) -> np.ndarray:
    """A checkpoint tensor in memory: read when it is a `Lazy` one."""
    return source.read() if isinstance(source, Lazy) else source


def rows_of(source):
    """rows(a, b) of a checkpoint tensor: read from the file when it can read part of a tensor,
    else from the tensor in memory."""
    if isinstance(source, Lazy) and source.by_rows:
        return source.read
    w = whole(source)
    return lambda a, b: w[a:b]


def empty(name: str, part, rows: int, cols: int):
    """An unfilled result with `rows` stored rows, of the kind `part` (one block of it) is."""
    if isinstance(part, Compact):

        def like(a):
            return None if a is None else np.empty((rows, *a.shape[1:]), a.dtype)

        return Compact(like(part.values), like(part.scale), part.encoding, part.transposed)
    return np.empty((cols, rows) if name in TRANSPOSED else (rows, cols), np.float32)


def put(name: str, out, part, a: int, b: int) -> None:
    """Write the encoded block of stored rows a:b into the result."""
    if isinstance(out, Compact):  # stored [rows, cols]: the torch layout
        out.values[a:b] = part.values
        if out.scale is not None:
            out.scale[a:b] = part.scale
    else:  # float32 in the reference layout
        torch_to_ours(name, out)[a:b] = torch_to_ours(name, part)


# The largest magnitude a weight may have in each storage: beyond it a float16 or bfloat16
# matrix would hold Inf, and so would a float32 one read from float64; a quantised one's scale
# (amax / qmax) must fit its scale dtype (int4's float16: 7 * 65504).
FLOAT32_MAX = float(np.finfo(np.float32).max)
LARGEST = {
    "float16": float(np.finfo(np.float16).max),
    "bfloat16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
}


def largest(name: str, ndim: int, fmt: WeightFormat) -> float:
    """The largest magnitude weight `name` (of `ndim` dims) can be stored with in `fmt`."""
    if ndim != 2:
        return FLOAT32_MAX
    enc = encoding_of(name, fmt)
    if enc.scaled:
        return min(FLOAT32_MAX, enc.qmax * float(np.finfo(enc.scale_dtype).max))
    return LARGEST.get(enc.name, FLOAT32_MAX)


def peak(w) -> float:
    """The largest magnitude in a float array, NaN or Inf when it holds one: the maximum of its
    bit patterns without the sign bit, which IEEE formats order as their magnitudes (integer
    arithmetic, so bfloat16, whose NumPy ufuncs are slow, is as fast as the rest)."""
    if w.size == 0:
        return 0.0
    bits = np.dtype(f"u{w.dtype.itemsize}")
    top = (w.view(bits) & bits.type(np.iinfo(bits).max >> 1)).max()
    return float(np.array(top, bits).view(w.dtype))


def scan(w, limit: float = FLOAT32_MAX) -> tuple[int, int]:
    """(values that are NaN or Inf, finite values beyond `limit`) of a block: one pass over it
    (its peak magnitude) when it holds neither, which is the rule."""
    if peak(w) <= limit:  # False for NaN
        return 0, 0
    finite = np.isfinite(w)
    over = np.count_nonzero(finite & (np.abs(w.astype(np.float64)) > limit))  # rare: no hurry
    return int(w.size - np.count_nonzero(finite)), int(over)


def check_finite(bad: int, size: int, where: str) -> None:
    """Refuse a tensor of `size` values of which `bad` are NaN or Inf."""
    if bad:
        raise CheckpointError(
            f"{where}: {bad} of {size} values are NaN or Inf (a weight must be finite)"
        )


def encode_rows(name: str, source, fmt: WeightFormat, group: int | None, where: str = ""):
    """Params field `name` in format `fmt` from its checkpoint tensor in torch layout (an array
    or a `Lazy`), encoded BLOCK bytes of float32 rows at a time into the result's arrays; any
    NaN or Inf is an error naming `where` (default: the `Lazy`'s file and name, else `name`)."""
    if not where:
        where = f"{source.file}: tensor {source.name}" if isinstance(source, Lazy) else name
    size = int(np.prod(source.shape))
    limit = largest(name, len(source.shape), fmt)
    bad = over = 0
    if len(source.shape) != 2:
        w = whole(source)
        bad, over = scan(w, limit)
        out = None if bad or over else np.array(encode(name, w, fmt, group))  # never a view
    else:
        rows, cols = source.shape
        step = max(1, BLOCK // (4 * max(cols, 1)))
        read, out = rows_of(source), None
        for a in range(0, rows, step) or [0]:
            b = min(rows, a + step)
            block = read(a, b)
            counts = scan(block, limit)
            bad, over = bad + counts[0], over + counts[1]
            if bad or over:  # the rest is only read, to count
                continue
            part = encode(name, torch_to_ours(name, block), fmt, group)
            out = empty(name, part, rows, cols) if out is None else out
            put(name, out, part, a, b)
    check_finite(bad, size, where)
    if over:
        enc = encoding_of(name, fmt)  # vectors stay float32: only a matrix has scales
        scaled = enc.scaled and len(source.shape) == 2
        stored = f"their {np.dtype(enc.scale_dtype).name} scale" if scaled else "they"
        raise CheckpointError(
            f"{where}: {over} values are too large for weight format {fmt.name} "
            f"(beyond {limit:.6g}: {stored} would be stored as Inf)"
        )
    return out
