"""SlimAttention in JAX: the reference's `slim_attention.py` with static query blocks and a
dynamic number of key blocks.

Query-row blocks are unrolled (their size is static: xFT's L2 rule); within a block, only the
key blocks up to the last visible column are computed (`lax.fori_loop` with a traced trip
count), filling a full `mb x S` score buffer that gets an exact softmax per row, then `P @ V`
over the same key blocks. The few-heads decode path splits the keys into chunks and merges
their (max, sum, output) exactly.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from slimllm.reference.slim_attention import L2_BUDGET, block_rows

from .attention import block_output, block_scores, group_bias, group_queries, ungroup
from .kv_cache import KEY_BLOCK, LayerKV

__all__ = ["L2_BUDGET", "block_rows", "slim_attention"]


def last_visible(bias_rows):
    """One past the last key column any of these query rows can see (traced)."""
    s = bias_rows.shape[-1]
    seen = jnp.isfinite(bias_rows).any(axis=tuple(range(bias_rows.ndim - 1)))
    return jnp.max(jnp.where(seen, jnp.arange(1, s + 1), 0))


def key_block_size(kv: LayerKV, key_block: int) -> int:
    n = min(key_block, kv.length)
    if kv.length % n:
        raise ValueError(f"cache length {kv.length} is not a multiple of the key block {n}")
    return n


def row_block(qg, kv: LayerKV, bias, scale, n: int):
    """Exact attention for a block of query rows over the key blocks they can see."""
    nb = (last_visible(bias) + n - 1) // n
    shape = qg.shape[:4]

    def fill(j, scores):
        blk = block_scores(qg, kv, j * n, n) * jnp.float32(scale)
        blk = blk + lax.dynamic_slice_in_dim(bias, j * n, n, axis=-1)
        return lax.dynamic_update_slice_in_dim(scores, blk, j * n, axis=-1)

    scores = lax.fori_loop(0, nb, fill, jnp.full((*shape, kv.length), -jnp.inf, jnp.float32))
    m = scores.max(axis=-1, keepdims=True)
    e = jnp.exp(scores - m)
    p = e / e.sum(axis=-1, keepdims=True)

    def add(j, acc):
        return acc + block_output(lax.dynamic_slice_in_dim(p, j * n, n, axis=-1), kv, j * n, n)

    return lax.fori_loop(0, nb, add, jnp.zeros(qg.shape, jnp.float32))


def split_keys_decode(qg, kv: LayerKV, bias, scale, splits: int, n: int):
    """Decode over `splits` key chunks of whole key blocks, each with local (m, l, O), merged."""
    nb = kv.length // n
    per = -(-nb // splits)  # key blocks per chunk
    parts = []
    for c in range(0, nb, per):
        size = min(per, nb - c) * n
        a = c * n
        scores = block_scores(qg, kv, a, size) * jnp.float32(scale) + bias[..., a : a + size]
        m = scores.max(axis=-1, keepdims=True)
        m_safe = jnp.where(jnp.isfinite(m), m, jnp.float32(0.0))
        e = jnp.exp(scores - m_safe)
        l = e.sum(axis=-1, keepdims=True)
        o = block_output(e, kv, a, size) / jnp.where(l > 0, l, jnp.float32(1.0))
        parts.append((m, l, o))
    m = jnp.max(jnp.stack([p[0] for p in parts]), axis=0)
    weights = [p[1] * jnp.exp(jnp.where(jnp.isfinite(p[0]), p[0] - m, -jnp.inf)) for p in parts]
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
    gb = group_bias(bias, kh)
    n = key_block_size(kv, key_block)
    if t == 1 and key_splits > 1:
        return ungroup(split_keys_decode(qg, kv, gb, scale, key_splits, n)).astype(jnp.float32)
    mb = mb or block_rows(t, d, budget)
    out = [
        row_block(qg[:, :, :, i : i + mb], kv, gb[:, :, :, i : i + mb], scale, n)
        for i in range(0, t, mb)
    ]
    return ungroup(jnp.concatenate(out, axis=3)).astype(jnp.float32)
