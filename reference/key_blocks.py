"""Attention read from the cache one key block at a time: what SlimAttention and flash share.

The definition (`attention.py`) dequantises a whole layer of the cache. The fast kinds never
build that float copy: they widen one block of n key slots to float32 at a time
(`LayerKV.keys/values`). For an int8 cache this is the paper's hybrid formulation (PAPER.md
section 3): the K scale multiplies score columns, `scores[:, j] = scale_K[j] * (q . qK[j])`, and
the V scale is folded into the probabilities, `out = sum_j (p[j] * scale_V[j]) * qV[j]`.
`exact_rows` is the definition computed this way over the first `width` key slots; a test checks
it equals `naive_attention` for every cache dtype. The JAX backend's `key_blocks.py` has the same
functions; its blocks start at traced slots, so they take a start and a static size n instead of
two bounds.
"""

from __future__ import annotations

import numpy as np

from .kv_cache import LayerKV
from .ops import softmax

KEY_BLOCK = 256  # key slots widened to float32 at a time (only matters for non-float32 caches)


def block_bounds(width: int, size: int) -> list[tuple[int, int]]:
    """Bounds [lo, hi) of consecutive blocks of `size` key slots covering [0, width)."""
    return [(lo, min(lo + size, width)) for lo in range(0, width, size)]


def block_scores(qg, kv: LayerKV, lo: int, hi: int):
    """Scores of grouped queries against key slots [lo, hi), K scale applied, not yet multiplied
    by the softmax scale: qg [b,k,g,t,d] -> [b,k,g,t,n], n = hi - lo."""
    scores = np.einsum("bkgtd,bknd->bkgtn", qg, kv.keys(lo, hi), optimize=True)  # [b,k,g,t,n]
    if kv.k_scale is not None:
        scores = scores * kv.k_scale[:, :, None, None, lo:hi]  # scale_K [b,k,1,1,n] on columns
    return scores


def block_output(p, kv: LayerKV, lo: int, hi: int):
    """Sum over key slots [lo, hi) of p * V, V scale folded into p: [b,k,g,t,n] -> [b,k,g,t,d]."""
    if kv.v_scale is not None:
        p = p * kv.v_scale[:, :, None, None, lo:hi]  # scale_V [b,k,1,1,n] into the weights
    return np.einsum("bkgtn,bknd->bkgtd", p, kv.values(lo, hi), optimize=True)  # [b,k,g,t,d]


def exact_rows(qg, kv: LayerKV, gbias, scale, width: int, key_block: int = KEY_BLOCK):
    """softmax(q kᵀ · scale + bias) · v over key slots [0, width), every score materialised and
    K/V read `key_block` slots at a time: qg [b,k,g,t,d], gbias [b,k|1,g|1,t,width] ->
    [b,k,g,t,d]."""
    blocks = block_bounds(width, key_block)
    parts = [block_scores(qg, kv, lo, hi) for lo, hi in blocks]  # [b,k,g,t,n] each
    scores = np.concatenate(parts, axis=-1)  # -> [b,k,g,t,width]
    probs = softmax(scores * np.float32(scale) + gbias, axis=-1)  # [b,k,g,t,width]
    return sum(block_output(probs[..., lo:hi], kv, lo, hi) for lo, hi in blocks)  # [b,k,g,t,d]
