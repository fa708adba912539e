"""INT8 quantisation of KV vectors: symmetric, one float32 scale per (batch, kv head, token).

Exactly as PAPER.md section 3: for one head's d values x of one token, amax = max|x|,
scale = amax / 127 (0 when amax = 0), q = round_half_to_even(x * (127 / amax)) in [-127, 127]
(-128 is never produced), dequantised value q * scale. Computed in float32 with `np.rint`
(IEEE round half to even); the JAX backend uses the same float32 operations.
"""

from __future__ import annotations

import numpy as np


def quantize(x):
    """x [..., d] float -> (q [..., d] int8, scale [...] float32)."""
    x = x.astype(np.float32)
    amax = np.max(np.abs(x), axis=-1)  # [..., d] -> [...]
    safe = np.where(amax > 0, amax, np.float32(1.0))
    inv = np.float32(127.0) / safe  # [...]
    q = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)  # [..., d] * [..., 1]
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(0.0)).astype(np.float32)
    return q, scale


def dequantize(q, scale):
    """q [..., d] int8 and scale [...] -> float32 values q * scale."""
    return q.astype(np.float32) * scale[..., None]  # [..., d] * [..., 1]


# bfloat16 has no NumPy dtype: the cache stores its bit patterns as uint16 (the top half of a
# float32, rounded to nearest even), and widens them back exactly.


def to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (NaN kept NaN)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


def from_bf16_bits(bits):
    """bfloat16 bit patterns -> float32, exactly (shifted in place: one 4-byte copy)."""
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)
