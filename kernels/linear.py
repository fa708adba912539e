"""The weight product as a compiled kernel: y = x @ widen(w).T for a device weight [out, in] in
any weight format (`src/linear.cc`), for the few rows of x that decoding multiplies.

`linear(x, w)` returns None when the kernel does not apply (kernels off or missing, more than
MAX_ROWS rows of x, widths the kernel does not tile), and the caller takes the XLA path.
Prefill's many rows stay with XLA's matrix products, which block for the caches, except on the
roads of kernels "fast" for more than 4 rows of x, which take any number of rows: the AMX road
(bfloat16 weights against x rounded to bfloat16, int8/int4 codes against x rounded to int8, in
tiles; int4 against more than 16 rows as bfloat16 values) and, on a CPU with AVX512-BF16 but
no AMX, the bfloat16 pairs road (x rounded to bfloat16 against bfloat16 weights, in VDPBF16PS,
with x's pairs broadcast against a block of weight rows for more than 16 rows of x, and for
any number of rows where the weights are stored in pair order, `Compact.pairs`;
x rounded to int8 against int8 codes and int4 codes in groups of 32, in VPDPBUSD; other codes
widened to bfloat16 values).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.jaxbackend import weight_format  # noqa: F401 (registers Compact as a pytree)
from slimllm.reference.weight_format import ENCODINGS, Compact

from . import active, available, choice, isa, target

# The kernel's numbering of the reference's encodings (src/linear.cc, enum Encoding).
ENCODING = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3, "int4": 4}
MAX_ROWS = 16  # rows of x (tokens of a decode batch) above which XLA's products are faster
LANES = 16  # the kernel's column step: widths and groups are multiples of it
AMX_ENCODINGS = ("bfloat16", "int8", "int4")  # the AMX and pairs roads' (as stored or widened)
AMX_COLS, AMX_ROWS = 32, 16  # the AMX tile step over columns, and its tiles' rows of w
PAIR_COLS = 32  # the pairs road's step over columns (one VDPBF16PS)
traced = collections.Counter()  # custom calls emitted while tracing, per encoding (for tests)


def applies(m: int, cols: int, w) -> bool:
    """Can the kernel multiply m rows of `cols` columns by w?"""
    if not active() or m < 1 or cols % LANES:
        return False
    if isinstance(w, Compact) and w.pairs:
        return columns_road(cols)  # any number of rows
    if isinstance(w, Compact):
        groups = 1 if w.scale is None else w.scale.shape[1]
        fits = w.encoding in ENCODING and not w.transposed and (cols // groups) % LANES == 0
        group = cols // groups
        return fits and (m <= MAX_ROWS or amx_road(group, w) or pairs_road(group, w))
    return w.dtype == jnp.float32 and m <= MAX_ROWS


def amx_road(group: int, w: Compact) -> bool:
    """Does the kernel take the AMX road for w (then any number of rows of x)? The same test
    as `src/linear.cc`'s `run`."""
    return (
        choice() == "fast"
        and isa() == "avx512-amx"
        and w.encoding in AMX_ENCODINGS
        and group % AMX_COLS == 0
        and w.values.shape[0] % AMX_ROWS == 0
    )


def pairs_road(group: int, w: Compact) -> bool:
    """Does the kernel take the bfloat16 pairs road for w where it has more than 4 rows of x
    (then any number of rows)? `src/linear.cc`'s `run` takes it off the AMX road."""
    return (
        choice() == "fast"
        and isa() in ("avx512-bf16", "avx512-amx")
        and w.encoding in AMX_ENCODINGS
        and group % PAIR_COLS == 0
        and not amx_road(group, w)
    )


def columns_road(cols: int) -> bool:
    """Does the kernel read bfloat16 weights stored in pair order (`Compact.pairs`), `cols`
    columns, in this program? Only the pairs' columns road does: kernels "fast" on a CPU with
    AVX512-BF16 and no AMX."""
    return choice() == "fast" and isa() == "avx512-bf16" and cols % PAIR_COLS == 0


def pair_order_wanted(kernels: str) -> bool:
    """Should an engine for Runtime.kernels `kernels` store its bfloat16 linear weights in pair
    order (`jaxbackend/params.py`)? Where the columns road reads them: it multiplies any number
    of rows of x without copying the weights first (programs with another choice widen them in
    XLA)."""
    return kernels == "fast" and available() and isa() == "avx512-bf16"


def batched_instruction(encoding: str, group: int | None, kernels: str) -> str | None:
    """The multiply-add instruction (kernels.PEAK_INSTRUCTIONS) that products of more than 4 rows
    of x by weights in `encoding` (in groups of `group` columns; None: one scale a row, taken
    here as a multiple of 64 columns) run on this CPU with this kernels choice: the roads of
    `src/linear.cc` and XLA's float32 products. None where that is not one `peak_macs` measures
    (AMX tiles, the 16-bit integer road) or the CPU has no AVX-512."""
    tier = isa()
    if tier in ("xla", "portable"):
        return None
    if kernels != "fast" or encoding not in AMX_ENCODINGS:
        return "fma"  # the float road and XLA's products widen to float32
    if tier == "avx512-amx":
        return None
    g = 64 if group is None else group
    if tier == "avx512-bf16" and g % PAIR_COLS == 0:
        quads = encoding == "int8" and g % 64 == 0
        lanes = encoding == "int4" and g == 32
        return "vpdpbusd" if quads or lanes else "vdpbf16ps"
    if encoding == "bfloat16" or tier == "avx512" or g % 32:
        return "fma"
    return None  # the 16-bit integer road (VPDPWSSD)


def linear(x, w):
    """x [..., in] @ w.T -> [..., out] float32, or None where the kernel does not apply."""
    cols = x.shape[-1]
    m = int(np.prod(x.shape[:-1]))
    if not applies(m, cols, w):
        return None
    values, scale, encoding = (
        (w.values, w.scale, w.encoding) if isinstance(w, Compact) else (w, None, "float32")
    )
    if scale is None:
        scale = jnp.zeros((1, 1), jnp.float32)  # unread: the encoding has no scales
    pairs = isinstance(w, Compact) and w.pairs
    rows = w.stored_shape[0] if pairs else values.shape[0]
    traced[encoding] += 1
    call = jax.ffi.ffi_call(
        target("slimllm_linear"),
        jax.ShapeDtypeStruct((m, rows), jnp.float32),
        vmap_method="sequential",
    )
    y = call(
        x.reshape(m, cols).astype(jnp.float32),
        values,
        scale.astype(ENCODINGS[encoding].scale_dtype),  # int4's float16 (a no-op as stored)
        encoding=np.int32(ENCODING[encoding]),
        integer=np.int32(choice() == "fast"),  # x rounded: bfloat16, int8 or 16-bit integers
        pairs=np.int32(pairs),
    )
    return y.reshape(*x.shape[:-1], rows)
