"""Naive attention: the definition every faster attention in slimllm is tested against.

Scores are materialised in full: `softmax(q k^T * scale + bias) v` per (batch, query head), with
grouped-query attention by viewing the h query heads as k groups of g. The additive bias holds
the mask (causal on cache slots, plus the prefix-LM rule) and ALiBi. Keys are the whole
preallocated cache; slots not yet written are masked because they lie in the future of every
query (slot > query slot).

K and V are read from the cache one key block at a time (`LayerKV.keys/values`). For an int8
cache this is the paper's hybrid formulation: `scores[:, j] = scale_K[j] * (q . qK[j])` and
`out = sum_j (p[j] * scale_V[j]) * qV[j]`, so a float copy of the cache is never built. The two
primitives `block_scores` and `block_output` are shared by the SlimAttention and flash variants.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .kv_cache import LayerKV
from .ops import softmax
from .positions import Positions, alibi_slopes

KEY_BLOCK = 256  # keys widened to float32 at a time (only matters for non-float32 caches)


def visible(pos: Positions, s: int):
    """Mask [b,t,s]: key slot j is visible to the query at slot i if j <= i or j < prefix."""
    j = np.arange(s)[None, None, :]
    return (j <= pos.slots[:, :, None]) | (j < pos.prefix[:, None, None])


def attention_bias(cfg: ModelConfig, pos: Positions, s: int):
    """Additive bias [b,h|1,t,s]: 0 or -inf from the mask, plus ALiBi slope * (j - i).

    ALiBi upstream adds slope * j; softmax is shift-invariant per row, and the relative form
    keeps float32 values small for long contexts.
    """
    mask = visible(pos, s)[:, None]  # [b,1,t,s]
    bias = np.where(mask, np.float32(0.0), np.float32(-np.inf))
    if cfg.pos == "alibi":
        rel = np.arange(s)[None, None, :] - pos.slots[:, :, None]  # [b,t,s]
        slopes = alibi_slopes(cfg.n_heads)[None, :, None, None]  # [1,h,1,1]
        bias = bias + slopes * rel[:, None].astype(np.float32)  # [b,h,t,s]
    return bias.astype(np.float32)


def group_bias(bias, k: int):
    """[b,h|1,t,s] -> [b,k|1,g|1,t,s] so it broadcasts against grouped scores."""
    b, h, t, s = bias.shape
    return bias.reshape(b, k, h // k, t, s) if h > 1 else bias[:, :, None]


def group_queries(q, k: int):
    """[b,t,h,d] -> [b,k,g,t,d]: query heads grouped under the kv head they share."""
    b, t, h, d = q.shape
    return q.reshape(b, t, k, h // k, d).transpose(0, 2, 3, 1, 4)


def ungroup(out):
    """[b,k,g,t,d] -> [b,t,h,d]."""
    b, k, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)


def block_scores(qg, kv: LayerKV, a: int, b: int):
    """Raw scores [b,k,g,t,n] of grouped queries against key slots [a, b) (K scale applied)."""
    s = np.einsum("bkgtd,bknd->bkgtn", qg, kv.keys(a, b), optimize=True)
    if kv.k_scale is not None:
        s = s * kv.k_scale[:, :, None, None, a:b]  # scale_K multiplies score columns
    return s


def block_output(p, kv: LayerKV, a: int, b: int):
    """sum over key slots [a, b) of p * V: p [b,k,g,t,n] -> [b,k,g,t,d] (V scale folded into p)."""
    if kv.v_scale is not None:
        p = p * kv.v_scale[:, :, None, None, a:b]
    return np.einsum("bkgtn,bknd->bkgtd", p, kv.values(a, b), optimize=True)


def naive_attention(q, kv: LayerKV, bias, scale, key_block: int = KEY_BLOCK):
    """softmax(q k^T * scale + bias) v with all scores materialised: q [b,t,h,d] -> [b,t,h,d]."""
    kh, s = kv.k.shape[1], kv.length
    qg = group_queries(q, kh)  # [b,k,g,t,d]
    blocks = [(a, min(a + key_block, s)) for a in range(0, s, key_block)]
    scores = np.concatenate([block_scores(qg, kv, a, b) for a, b in blocks], axis=-1)
    probs = softmax(scores * np.float32(scale) + group_bias(bias, kh), axis=-1)  # [b,k,g,t,s]
    out = sum(block_output(probs[..., a:b], kv, a, b) for a, b in blocks)
    return ungroup(out).astype(np.float32)
