"""A FlashAttention-style baseline: 2-D tiles over queries and keys with an online softmax.

For each tile of query rows, key tiles are visited in order while a running max m, running sum
l and unnormalised output acc are kept per row; whenever a key tile raises the max, l and acc
are rescaled by exp(m_old - m_new). The output is acc / l at the end. Key tiles entirely in the
future of a query tile are skipped. This is the algorithm SlimAttention is compared against
(PAPER.md section 2); both equal naive attention to float rounding. Tiles read the cache through
the key-block primitives (`key_blocks.py`), so an int8 cache is never widened as a whole.
"""

from __future__ import annotations

import numpy as np

from .attention import group_bias, group_queries, ungroup
from .key_blocks import block_output, block_scores
from .kv_cache import LayerKV
from .slim_attention import last_visible


def flash_attention(q, kv: LayerKV, bias, scale, q_tile: int = 64, k_tile: int = 64):
    """Online-softmax attention over [q_tile x k_tile] tiles: q [b,t,h,d] -> [b,t,h,d]."""
    b, t, h, d = q.shape
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)  # [b,t,h,d] -> [b,k,g,t,d]
    gb = group_bias(bias, kh)  # [b,h|1,t,s] -> [b,k|1,g|1,t,s]
    out = []
    for i in range(0, t, q_tile):
        q_rows, bias_rows = qg[:, :, :, i : i + q_tile], gb[:, :, :, i : i + q_tile]
        shape = q_rows.shape[:4] + (1,)  # [b,k,g,t',1]: one running value per query row
        m = np.full(shape, -np.inf, np.float32)
        l = np.zeros(shape, np.float32)
        acc = np.zeros(q_rows.shape, np.float32)  # [b,k,g,t',d]
        for lo in range(0, last_visible(bias_rows), k_tile):
            hi = min(lo + k_tile, kv.length)
            scores = block_scores(q_rows, kv, lo, hi) * np.float32(scale)  # [b,k,g,t',n]
            scores = scores + bias_rows[..., lo:hi]
            m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))  # [b,k,g,t',1]
            m_safe = np.where(np.isfinite(m_new), m_new, np.float32(0.0))
            rescale = np.exp(np.where(np.isfinite(m), m - m_safe, -np.inf))
            p = np.exp(scores - m_safe)  # [b,k,g,t',n]
            l = rescale * l + p.sum(axis=-1, keepdims=True)  # [b,k,g,t',n] -> [b,k,g,t',1]
            acc = rescale * acc + block_output(p, kv, lo, hi)  # [b,k,g,t',d]
            m = m_new
        out.append(acc / np.where(l > 0, l, np.float32(1.0)))
    return ungroup(np.concatenate(out, axis=3)).astype(np.float32)  # -> [b,k,g,t,d] -> [b,t,h,d]
