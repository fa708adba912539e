"""A FlashAttention-style baseline: 2-D tiles over queries and keys with an online softmax.

For each tile of query rows, key tiles are visited in order while a running max m, running sum
l and unnormalised output acc are kept per row; whenever a key tile raises the max, l and acc
are rescaled by exp(m_old - m_new). The output is acc / l at the end. Key tiles entirely in the
future of a query tile are skipped. This is the algorithm SlimAttention is compared against
(PAPER.md section 2); both equal naive attention to float rounding.
"""

from __future__ import annotations

import numpy as np

from .attention import block_output, block_scores, group_bias, group_queries, ungroup
from .kv_cache import LayerKV
from .slim_attention import last_visible


def flash_attention(q, kv: LayerKV, bias, scale, q_tile: int = 64, k_tile: int = 64):
    """Online-softmax attention over [q_tile x k_tile] tiles: q [b,t,h,d] -> [b,t,h,d]."""
    b, t, h, d = q.shape
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)  # [b,k,g,t,d]
    gb = group_bias(bias, kh)
    out = []
    for i in range(0, t, q_tile):
        qt, bt = qg[:, :, :, i : i + q_tile], gb[:, :, :, i : i + q_tile]
        shape = qt.shape[:4] + (1,)
        m = np.full(shape, -np.inf, np.float32)
        l = np.zeros(shape, np.float32)
        acc = np.zeros(qt.shape, np.float32)
        for a in range(0, last_visible(bt), k_tile):
            e = min(a + k_tile, kv.length)
            s = block_scores(qt, kv, a, e) * np.float32(scale) + bt[..., a:e]
            m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
            m_safe = np.where(np.isfinite(m_new), m_new, np.float32(0.0))
            rescale = np.exp(np.where(np.isfinite(m), m - m_safe, -np.inf))
            p = np.exp(s - m_safe)
            l = rescale * l + p.sum(axis=-1, keepdims=True)
            acc = rescale * acc + block_output(p, kv, a, e)
            m = m_new
        out.append(acc / np.where(l > 0, l, np.float32(1.0)))
    return ungroup(np.concatenate(out, axis=3)).astype(np.float32)
