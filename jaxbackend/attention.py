"""Attention in JAX: the reference's `attention.py` (masks, ALiBi bias, grouped heads), with
naive attention computed in key blocks.

The reference's `naive_attention` is the literal definition: it dequantises the layer's K and V
and materialises every score. This one computes the same maths (every score materialised, an
exact softmax per row) with `key_blocks.exact_rows`, which widens the cache one key block at a
time: XLA then never holds a float copy of an int8 cache (a test reads the compiled program).
The conformance table pairs the two `naive_attention`s.

Where the compiled kernels are active (`slimllm.kernels.active()`), naive attention is one
custom call (`slimllm.kernels.attention.naive_attention`: every score row complete, one exact
softmax, threads over batch and heads, the cache read in place). XLA's blocked form spent ~2.5
ms per layer of a batch-16 decode step on small batched dots and on slicing key blocks out of
the cache (150M shape, int8 weights: the step went from 64 to 37 ms, batch 1 from 9.1 to 7.3).
"""

from __future__ import annotations

import jax.numpy as jnp

from slimllm.kernels import attention as kernel
from slimllm.reference.config import ModelConfig

from .key_blocks import exact_rows
from .kv_cache import KEY_BLOCK, LayerKV
from .positions import Positions, alibi_slopes


def visible(pos: Positions, s: int):
    """Mask [b,t,s]: key slot j is visible to the query at slot i if j <= i or j < prefix."""
    j = jnp.arange(s)[None, None, :]  # [s] -> [1,1,s]
    return (j <= pos.slots[:, :, None]) | (j < pos.prefix[:, None, None])  # -> [b,t,s]


def attention_bias(cfg: ModelConfig, pos: Positions, s: int):
    """Additive bias [b,h|1,t,s]: 0 or -inf from the mask, plus ALiBi slope * (j - i)."""
    mask = visible(pos, s)[:, None]  # [b,t,s] -> [b,1,t,s]
    bias = jnp.where(mask, jnp.float32(0.0), jnp.float32(-jnp.inf))
    if cfg.pos == "alibi":
        rel = jnp.arange(s)[None, None, :] - pos.slots[:, :, None]  # [1,1,s] - [b,t,1] -> [b,t,s]
        slopes = jnp.asarray(alibi_slopes(cfg.n_heads))[None, :, None, None]  # [h] -> [1,h,1,1]
        bias = bias + slopes * rel[:, None].astype(jnp.float32)  # [b,1,t,s] -> [b,h,t,s]
    return bias


def group_bias(bias, k: int):
    """[b,h|1,t,s] -> [b,k|1,g|1,t,s] so it broadcasts against grouped scores."""
    b, h, t, s = bias.shape
    if h == 1:
        return bias[:, :, None]  # [b,1,t,s] -> [b,1,1,t,s]
    return bias.reshape(b, k, h // k, t, s)  # [b,h,t,s] -> [b,k,g,t,s]


def group_queries(q, k: int):
    """Query heads grouped under the kv head they share: [b,t,h,d] -> [b,k,g,t,d]."""
    b, t, h, d = q.shape
    return q.reshape(b, t, k, h // k, d).transpose(0, 2, 3, 1, 4)  # -> [b,t,k,g,d] -> [b,k,g,t,d]


def ungroup(out):
    """[b,k,g,t,d] -> [b,t,h,d]."""
    b, k, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)  # -> [b,t,k,g,d] -> [b,t,h,d]


def naive_attention(q, kv: LayerKV, bias, scale, key_block: int = KEY_BLOCK):
    """softmax(q kᵀ · scale + bias) · v, every score materialised, K and V read `key_block` slots
    at a time (the reference's definition, computed blocked for speed): [b,t,h,d] -> [b,t,h,d].
    Where the compiled kernels are active, the kernel computes it instead (module docstring)."""
    out = kernel.naive_attention(q, kv, bias, scale)  # None: not the kernel's case
    if out is not None:
        return out
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)  # [b,t,h,d] -> [b,k,g,t,d]
    out = exact_rows(qg, kv, group_bias(bias, kh), scale, kv.length, key_block)  # [b,k,g,t,d]
    return ungroup(out).astype(jnp.float32)  # [b,k,g,t,d] -> [b,t,h,d]
