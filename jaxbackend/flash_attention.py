"""The FlashAttention-style baseline in JAX: static query tiles, a `lax.fori_loop` over the key
tiles each query tile can see, online softmax with rescaling (the reference's algorithm)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .attention import block_output, block_scores, group_bias, group_queries, ungroup
from .kv_cache import LayerKV
from .slim_attention import key_block_size, last_visible


def flash_attention(q, kv: LayerKV, bias, scale, q_tile: int = 64, k_tile: int = 64):
    """Online-softmax attention over [q_tile x k_tile] tiles: q [b,t,h,d] -> [b,t,h,d]."""
    b, t, h, d = q.shape
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)
    gb = group_bias(bias, kh)
    n = key_block_size(kv, k_tile)
    out = []
    for i in range(0, t, q_tile):
        qt, bt = qg[:, :, :, i : i + q_tile], gb[:, :, :, i : i + q_tile]
        shape = qt.shape[:4] + (1,)

        def tile(j, carry, qt=qt, bt=bt):
            m, l, acc = carry
            s = block_scores(qt, kv, j * n, n) * jnp.float32(scale)
            s = s + lax.dynamic_slice_in_dim(bt, j * n, n, axis=-1)
            m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, jnp.float32(0.0))
            rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            p = jnp.exp(s - m_safe)
            l = rescale * l + p.sum(axis=-1, keepdims=True)
            acc = rescale * acc + block_output(p, kv, j * n, n)
            return m_new, l, acc

        start = (
            jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(qt.shape, jnp.float32),
        )
        m, l, acc = lax.fori_loop(0, (last_visible(bt) + n - 1) // n, tile, start)
        out.append(acc / jnp.where(l > 0, l, jnp.float32(1.0)))
    return ungroup(jnp.concatenate(out, axis=3)).astype(jnp.float32)
