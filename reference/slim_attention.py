"""SlimAttention (PAPER.md section 2): attention split only along the query rows.

Each block of `mb` query rows computes its complete score rows against every key it can see,
an exact softmax per row (max, exp, sum, divide; no running statistics), then `P @ V`. Compared
with FlashAttention's 2-D tiling there is no rescaling of partial outputs and no second pass;
the price is an `mb x S` score buffer per worker, sized to fit a CPU's L2 cache by `block_rows`.
Causal prefill skips keys past the block's last visible column (they would be masked anyway).

Decode with few heads per worker splits the key range instead (flash-decoding): each chunk
keeps its max m_c, sum l_c and normalised output O_c, merged exactly as
`O = sum_c O_c l_c exp(m_c - m) / sum_c l_c exp(m_c - m)`, `m = max_c m_c`.
Both equal naive attention up to float rounding, for every mask, bias and cache dtype.
"""

from __future__ import annotations

import math

import numpy as np

from .attention import KEY_BLOCK, block_output, block_scores, group_bias, group_queries, ungroup
from .kv_cache import LayerKV

L2_BUDGET = 524288  # float32 values in xFT's 2 MiB L2 budget


def block_rows(t: int, d: int, budget: int = L2_BUDGET) -> int:
    """xFT's query block size: one block if q/k/v alone overflow the budget, else split so that
    a block's q, k, v and score rows fit: splits = ceil((2 t d + t^2) / (budget - 2 t d))."""
    qkv, score = t * d, t * t
    if budget <= 2 * qkv:
        return t
    splits = math.ceil((2 * qkv + score) / (budget - 2 * qkv))
    return math.ceil(t / splits)


def last_visible(bias_rows) -> int:
    """One past the last key column any of these query rows can see."""
    cols = np.flatnonzero(np.isfinite(bias_rows).any(axis=tuple(range(bias_rows.ndim - 1))))
    return int(cols[-1]) + 1 if cols.size else 0


def row_block(qg, kv: LayerKV, bias, scale, key_block: int):
    """Exact attention for a block of query rows: full score rows, softmax, P @ V."""
    s = last_visible(bias)
    blocks = [(a, min(a + key_block, s)) for a in range(0, s, key_block)]
    scores = np.concatenate([block_scores(qg, kv, a, b) for a, b in blocks], axis=-1)
    scores = scores * np.float32(scale) + bias[..., :s]  # [b,k,g,m,s]
    m = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - m)
    p = e / e.sum(axis=-1, keepdims=True)
    return sum(block_output(p[..., a:b], kv, a, b) for a, b in blocks)


def split_keys_decode(qg, kv: LayerKV, bias, scale, splits: int):
    """Decode over `splits` key chunks, each with local (m, l, O), merged exactly."""
    s = last_visible(bias)
    size = math.ceil(s / splits)
    parts = []
    for a in range(0, s, size):
        b = min(a + size, s)
        scores = block_scores(qg, kv, a, b) * np.float32(scale) + bias[..., a:b]
        m = scores.max(axis=-1, keepdims=True)  # [b,k,g,1,1]
        m_safe = np.where(np.isfinite(m), m, np.float32(0.0))
        e = np.exp(scores - m_safe)
        l = e.sum(axis=-1, keepdims=True)
        o = block_output(e, kv, a, b) / np.where(l > 0, l, np.float32(1.0))
        parts.append((m, l, o))
    m = np.max([p[0] for p in parts], axis=0)
    weights = [p[1] * np.exp(np.where(np.isfinite(p[0]), p[0] - m, -np.inf)) for p in parts]
    out = sum(w * p[2] for w, p in zip(weights, parts, strict=True))
    return out / sum(weights)


def slim_attention(
    q,
    kv: LayerKV,
    bias,
    scale,
    mb: int | None = None,
    key_splits: int = 1,
    budget: int = L2_BUDGET,
    key_block: int = KEY_BLOCK,
):
    """SlimAttention: q [b,t,h,d] -> [b,t,h,d], query-row blocks of `mb` (default: xFT rule)."""
    b, t, h, d = q.shape
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)  # [b,k,g,t,d]
    gb = group_bias(bias, kh)  # [b,k|1,g|1,t,s]
    if t == 1 and key_splits > 1:
        return ungroup(split_keys_decode(qg, kv, gb, scale, key_splits)).astype(np.float32)
    mb = mb or block_rows(t, d, budget)
    out = [
        row_block(qg[:, :, :, i : i + mb], kv, gb[:, :, :, i : i + mb], scale, key_block)
        for i in range(0, t, mb)
    ]
    return ungroup(np.concatenate(out, axis=3)).astype(np.float32)
