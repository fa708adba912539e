"""Attention read from the cache one key block at a time, in JAX: the reference's
`key_blocks.py`, with blocks that start at traced slots.

A block is `n` key slots from a start `lo` that may be traced (a loop index), so functions take
(lo, n) with n static where the reference takes bounds [lo, hi). Keys and values are widened to
float32 right before each float32 dot (XLA:CPU is fast only for float32 dots), with int8 scales
on score columns and folded into the weights. `exact_rows` is the definition over the first
`width` key slots; here it is also what `naive_attention` runs, and SlimAttention runs it per
block of query rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .kv_cache import KEY_BLOCK, LayerKV


def key_blocking(width: int, key_block: int = KEY_BLOCK) -> tuple[int, int]:
    """(number of blocks, block size) to read key slots [0, width): `key_block`-sized blocks
    when longer than one, else two halves. float32 gains nothing from widening, but a loop over
    blocks reads the just-written cache in place: read in one piece, XLA fuses the write into
    the read and copies the cache (5 copies per layer per decode step measured, at any width; a
    one-block loop is unrolled, so two blocks at least)."""
    n = key_block if width > key_block else width // 2 if width % 2 == 0 else width
    if width % n:
        raise ValueError(f"key range {width} is not a multiple of the key block {n}")
    return width // n, n


def block_scores(qg, kv: LayerKV, lo, n: int):
    """Scores of grouped queries against key slots [lo, lo+n), K scale applied, not yet multiplied
    by the softmax scale: qg [b,k,g,t,d] -> [b,k,g,t,n]."""
    scores = jnp.einsum("bkgtd,bknd->bkgtn", qg, kv.keys(lo, n))  # [b,k,g,t,n]
    if kv.k_scale is not None:
        scores = scores * kv.key_scales(lo, n)[:, :, None, None, :]  # scale_K [b,k,1,1,n]
    return scores


def block_output(p, kv: LayerKV, lo, n: int):
    """Sum over key slots [lo, lo+n) of p * V, V scale folded into p: [b,k,g,t,n] -> [b,k,g,t,d]."""
    if kv.v_scale is not None:
        p = p * kv.value_scales(lo, n)[:, :, None, None, :]  # scale_V [b,k,1,1,n] into the weights
    return jnp.einsum("bkgtn,bknd->bkgtd", p, kv.values(lo, n))  # [b,k,g,t,d]


def exact_rows(qg, kv: LayerKV, gbias, scale, width: int, key_block: int = KEY_BLOCK):
    """softmax(q kᵀ · scale + bias) · v over key slots [0, width), every score materialised:
    qg [b,k,g,t,d], gbias [b,k|1,g|1,t,width] -> [b,k,g,t,d]. Keys and values are read
    `key_block` at a time in a loop, whatever the format (widened right before each dot). The
    scores stay block-major [nb,b,k,g,t,n] (putting the blocks side by side copied them all),
    and each block's probabilities are made as the loop reaches it: an int8 prefill holds no
    more than a float32 one."""
    nb, n = key_blocking(width, key_block)

    def scores(i):  # [b,k,g,t,n], softmax-scaled, bias added
        block = block_scores(qg, kv, i * n, n) * jnp.float32(scale)
        return block + lax.dynamic_slice_in_dim(gbias, i * n, n, axis=-1)

    # Every block is overwritten: the buffer starts filled with a query value only so that it is
    # made in this layer (a constant start, XLA allocated every layer's scores at the outset).
    start = jnp.full((nb, *qg.shape[:4], n), qg[(0,) * qg.ndim])  # [nb,b,k,g,t,n]
    blocks = lax.fori_loop(0, nb, lambda i, acc: acc.at[i].set(scores(i)), start)  # every score
    m = jnp.max(blocks, axis=(0, -1), keepdims=True)[0]  # [b,k,g,t,1]: row max
    m = jnp.where(jnp.isfinite(m), m, jnp.float32(0.0))  # an all-masked row has none

    # The row sums in a pass of their own: summed in the loop, each block's probabilities were
    # kept twice for int8 (as they are and with V's scales folded in).
    total = jnp.sum(jnp.exp(blocks - m), axis=(0, -1), keepdims=True)[0]  # [b,k,g,t,1]

    def add_block(i, out):
        return out + block_output(jnp.exp(blocks[i] - m), kv, i * n, n)  # [b,k,g,t,d]

    out = lax.fori_loop(0, nb, add_block, jnp.zeros(qg.shape, jnp.float32))  # [b,k,g,t,d]
    # normalising the [t,d] output costs less than the [t,width] scores
    return out / jnp.where(total > 0, total, jnp.float32(1.0))
