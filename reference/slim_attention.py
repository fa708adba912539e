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

from .attention import group_bias, group_queries, ungroup
from .key_blocks import KEY_BLOCK, block_bounds, block_output, block_scores, exact_rows
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


def row_block(qg, kv: LayerKV, gbias, scale, key_block: int):
    """Exact attention for a block of query rows: their complete score rows against every key
    slot they can see, an exact softmax per row, then P @ V: [b,k,g,t,d] -> [b,k,g,t,d]."""
    width = last_visible(gbias)
    return exact_rows(qg, kv, gbias[..., :width], scale, width, key_block)


def split_keys_decode(qg, kv: LayerKV, gbias, scale, splits: int):
    """Decode over `splits` key chunks, each with local (m, l, O), merged exactly."""
    width = last_visible(gbias)
    parts = []
    for lo, hi in block_bounds(width, math.ceil(width / splits)):
        scores = block_scores(qg, kv, lo, hi) * np.float32(scale)  # [b,k,g,1,n]
        scores = scores + gbias[..., lo:hi]
        m = scores.max(axis=-1, keepdims=True)  # [b,k,g,1,n] -> [b,k,g,1,1]
        m_safe = np.where(np.isfinite(m), m, np.float32(0.0))
        w = np.exp(scores - m_safe)  # unnormalised weights [b,k,g,1,n]
        l = w.sum(axis=-1, keepdims=True)  # [b,k,g,1,n] -> [b,k,g,1,1]
        o = block_output(w, kv, lo, hi) / np.where(l > 0, l, np.float32(1.0))  # [b,k,g,1,d]
        parts.append((m, l, o))
    m = np.max([m_c for m_c, _, _ in parts], axis=0)  # [chunks,b,k,g,1,1] -> [b,k,g,1,1]
    weights = [l_c * np.exp(np.where(np.isfinite(m_c), m_c - m, -np.inf)) for m_c, l_c, _ in parts]
    out = sum(w_c * o_c for w_c, (_, _, o_c) in zip(weights, parts, strict=True))
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
    qg = group_queries(q, kh)  # [b,t,h,d] -> [b,k,g,t,d]
    gb = group_bias(bias, kh)  # [b,h|1,t,s] -> [b,k|1,g|1,t,s]
    if t == 1 and key_splits > 1:
        out = split_keys_decode(qg, kv, gb, scale, key_splits)  # [b,k,g,1,d]
        return ungroup(out).astype(np.float32)  # [b,k,g,1,d] -> [b,1,h,d]
    mb = mb or block_rows(t, d, budget)
    out = [
        row_block(qg[:, :, :, i : i + mb], kv, gb[:, :, :, i : i + mb], scale, key_block)
        for i in range(0, t, mb)
    ]  # [b,k,g,mb,d] each
    return ungroup(np.concatenate(out, axis=3)).astype(np.float32)  # -> [b,k,g,t,d] -> [b,t,h,d]
