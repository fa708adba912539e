"""The FlashAttention-style baseline in JAX: static query tiles, a `lax.fori_loop` over the key
tiles each query tile can see, online softmax with rescaling (the reference's algorithm)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .attention import group_bias, group_queries, ungroup
from .key_blocks import block_output, block_scores
from .kv_cache import LayerKV
from .slim_attention import key_block_size, last_visible


def flash_attention(q, kv: LayerKV, bias, scale, q_tile: int = 64, k_tile: int = 64):
    """Online-softmax attention over [q_tile x k_tile] tiles: q [b,t,h,d] -> [b,t,h,d]."""
    b, t, h, d = q.shape
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)  # [b,t,h,d] -> [b,k,g,t,d]
    gb = group_bias(bias, kh)  # [b,h|1,t,s] -> [b,k|1,g|1,t,s]
    n = key_block_size(kv, k_tile)
    out = []
    for i in range(0, t, q_tile):
        q_rows, bias_rows = qg[:, :, :, i : i + q_tile], gb[:, :, :, i : i + q_tile]
        shape = q_rows.shape[:4] + (1,)  # [b,k,g,t',1]: one running value per query row

        def tile(j, carry, q_rows=q_rows, bias_rows=bias_rows):
            m, l, acc = carry
            scores = block_scores(q_rows, kv, j * n, n) * jnp.float32(scale)  # [b,k,g,t',n]
            scores = scores + lax.dynamic_slice_in_dim(bias_rows, j * n, n, axis=-1)
            m_new = jnp.maximum(m, scores.max(axis=-1, keepdims=True))  # [b,k,g,t',1]
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, jnp.float32(0.0))
            rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            p = jnp.exp(scores - m_safe)  # [b,k,g,t',n]
            l = rescale * l + p.sum(axis=-1, keepdims=True)  # [b,k,g,t',n] -> [b,k,g,t',1]
            acc = rescale * acc + block_output(p, kv, j * n, n)  # [b,k,g,t',d]
            return m_new, l, acc

        start = (
            jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_rows.shape, jnp.float32),  # [b,k,g,t',d]
        )
        m, l, acc = lax.fori_loop(0, (last_visible(bias_rows) + n - 1) // n, tile, start)
        out.append(acc / jnp.where(l > 0, l, jnp.float32(1.0)))
    return ungroup(jnp.concatenate(out, axis=3)).astype(jnp.float32)  # -> [b,t,h,d]
