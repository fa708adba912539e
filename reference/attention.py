"""Attention as defined: the formula every faster attention in slimllm is tested against.

`naive_attention` is the textbook line with every score materialised. It first dequantises the
layer's K and V to float32 (int8 values times their per-token scales; float16 and bfloat16
widened), then computes `softmax(q kᵀ · scale + bias) · v` per (batch, query head), with
grouped-query attention by viewing the h query heads as k groups of g. The additive bias holds
the mask (causal on cache slots, plus the prefix-LM rule) and ALiBi. Keys are the whole
preallocated cache; slots not yet written are masked because they lie in the future of every
query (slot > query slot).

SlimAttention and the flash baseline compute the same numbers without a float copy of the cache:
they read it one key block at a time (`key_blocks.py`, the paper's hybrid int8 matmuls). The
JAX backend's `naive_attention` is that key-blocked form, for speed; the conformance table pairs
it with this definition.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .kv_cache import LayerKV, dequantized
from .ops import softmax
from .positions import Positions, alibi_slopes


def visible(pos: Positions, s: int):
    """Mask [b,t,s]: key slot j is visible to the query at slot i if j <= i or j < prefix."""
    j = np.arange(s)[None, None, :]  # [s] -> [1,1,s]
    return (j <= pos.slots[:, :, None]) | (j < pos.prefix[:, None, None])  # -> [b,t,s]


def attention_bias(cfg: ModelConfig, pos: Positions, s: int):
    """Additive bias [b,h|1,t,s]: 0 or -inf from the mask, plus ALiBi slope * (j - i).

    ALiBi upstream adds slope * j; softmax is shift-invariant per row, and the relative form
    keeps float32 values small for long contexts.
    """
    mask = visible(pos, s)[:, None]  # [b,t,s] -> [b,1,t,s]
    bias = np.where(mask, np.float32(0.0), np.float32(-np.inf))
    if cfg.pos == "alibi":
        rel = np.arange(s)[None, None, :] - pos.slots[:, :, None]  # [1,1,s] - [b,t,1] -> [b,t,s]
        slopes = alibi_slopes(cfg.n_heads)[None, :, None, None]  # [h] -> [1,h,1,1]
        bias = bias + slopes * rel[:, None].astype(np.float32)  # [b,1,t,s] -> [b,h,t,s]
    return bias.astype(np.float32)


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


def naive_attention(q, kv: LayerKV, bias, scale):
    """softmax(q kᵀ · scale + bias) · v over the dequantised cache: q [b,t,h,d] -> [b,t,h,d]."""
    k, v = dequantized(kv)  # stored [b,k,s,d] -> float32 [b,k,s,d] each
    kh = k.shape[1]
    qg = group_queries(q, kh)  # [b,t,h,d] -> [b,k,g,t,d]
    scores = np.einsum("bkgtd,bksd->bkgts", qg, k, optimize=True)  # -> [b,k,g,t,s]
    probs = softmax(scores * np.float32(scale) + group_bias(bias, kh), axis=-1)  # [b,k,g,t,s]
    out = np.einsum("bkgts,bksd->bkgtd", probs, v, optimize=True)  # [b,k,g,t,s] -> [b,k,g,t,d]
    return ungroup(out).astype(np.float32)  # [b,k,g,t,d] -> [b,t,h,d]
