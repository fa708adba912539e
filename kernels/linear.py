"""The weight product as a compiled kernel: y = x @ widen(w).T for a device weight [out, in] in
any weight format (`src/linear.cc`), for the few rows of x that decoding multiplies.

`linear(x, w)` returns None when the kernel does not apply (kernels off or missing, more than
MAX_ROWS rows of x, widths the kernel does not tile), and the caller takes the XLA path.
Prefill's many rows stay with XLA's matrix products, which block for the caches.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.jaxbackend import weight_format  # noqa: F401 (registers Compact as a pytree)
from slimllm.reference.weight_format import Compact

from . import active, choice, target

# The kernel's numbering of the reference's encodings (src/linear.cc, enum Encoding).
ENCODING = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3, "int4": 4}
MAX_ROWS = 16  # rows of x (tokens of a decode batch) above which XLA's products are faster
LANES = 16  # the kernel's column step: widths and groups are multiples of it
traced = collections.Counter()  # custom calls emitted while tracing, per encoding (for tests)


def applies(m: int, cols: int, w) -> bool:
    """Can the kernel multiply m rows of `cols` columns by w?"""
    if not active() or m < 1 or m > MAX_ROWS or cols % LANES:
        return False
    if isinstance(w, Compact):
        groups = 1 if w.scale is None else w.scale.shape[1]
        return w.encoding in ENCODING and not w.transposed and (cols // groups) % LANES == 0
    return w.dtype == jnp.float32


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
    rows = values.shape[0]
    traced[encoding] += 1
    call = jax.ffi.ffi_call(
        target("slimllm_linear"),
        jax.ShapeDtypeStruct((m, rows), jnp.float32),
        vmap_method="sequential",
    )
    y = call(
        x.reshape(m, cols).astype(jnp.float32),
        values,
        scale.astype(jnp.float32),
        encoding=np.int32(ENCODING[encoding]),
        integer=np.int32(choice() == "fast"),  # int8/int4 on x rounded to 16 bits (src/linear.cc)
    )
    return y.reshape(*x.shape[:-1], rows)
