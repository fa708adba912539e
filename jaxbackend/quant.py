"""INT8 quantisation of KV vectors: the reference's `quant.py` in jnp, the same float32 steps.
The int8 codes match the reference; a scale can differ by one ulp, because XLA:CPU turns
`amax / 127` into a multiplication by the reciprocal (conformance compares scales to 1e-5)."""

from __future__ import annotations

import jax.numpy as jnp


def quantize(x):
    """x [..., d] float -> (q [..., d] int8, scale [...] float32)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)  # [..., d] -> [...]
    safe = jnp.where(amax > 0, amax, jnp.float32(1.0))
    inv = jnp.float32(127.0) / safe  # [...]
    q = jnp.clip(jnp.round(x * inv[..., None]), -127, 127).astype(jnp.int8)  # half to even
    scale = jnp.where(amax > 0, amax / jnp.float32(127.0), jnp.float32(0.0))
    return q, scale


def dequantize(q, scale):
    """q [..., d] int8 and scale [...] -> float32 values q * scale."""
    return q.astype(jnp.float32) * scale[..., None]  # [..., d] * [..., 1]
