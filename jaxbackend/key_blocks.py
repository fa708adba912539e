"""Attention read from the cache one key block at a time, in JAX: the reference's
`key_blocks.py`, with blocks that start at traced slots.

A block is `n` key slots from a start `lo` that may be traced (a loop index), so functions take
(lo, n) with n static where the reference takes bounds [lo, hi). Keys and values are widened to
float32 right before each float32 dot (XLA:CPU is fast only for float32 dots), with int8 scales
on score columns and folded into the weights. `exact_rows` is the definition over the first
`width` key slots; here it is also what `naive_attention` runs, and SlimAttention runs it per
block of query rows. It reads a float32 cache whole when more than one query row reads it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .kv_cache import KEY_BLOCK, LayerKV


def key_blocking(width: int, key_block: int = KEY_BLOCK) -> tuple[int, int]:
    """(number of blocks, block size) to read key slots [0, width): `key_block`-sized blocks
    when longer than one. float32 gains nothing from widening, but reading a decode step's cache
    in blocks too keeps XLA from copying the just-written cache into the attention fusion
    (measured: 5 cache copies per layer at b=1)."""
    n = width if width <= key_block else key_block
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


def softmax_parts(scores):
    """Unnormalised softmax: (exp(scores - row max), row sum or 1 for an all-masked row)."""
    m = jnp.max(scores, axis=-1, keepdims=True)  # [..., s] -> [..., 1]
    w = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, jnp.float32(0.0)))
    total = jnp.sum(w, axis=-1, keepdims=True)  # [..., s] -> [..., 1]
    return w, jnp.where(total > 0, total, jnp.float32(1.0))


def exact_rows(qg, kv: LayerKV, gbias, scale, width: int, key_block: int = KEY_BLOCK):
    """softmax(q kᵀ · scale + bias) · v over key slots [0, width), every score materialised:
    qg [b,k,g,t,d], gbias [b,k|1,g|1,t,width] -> [b,k,g,t,d]. A float32 cache read by more than
    one query row is read whole (one large dot multiplies faster than a loop of small ones);
    otherwise keys are read `key_block` at a time (widened right before each dot)."""
    whole = kv.fmt.wide and qg.shape[3] > 1
    nb, n = (1, width) if whole else key_blocking(width, key_block)
    if nb == 1:
        scores = block_scores(qg, kv, 0, n)  # [b,k,g,t,width]
    else:
        blocks = lax.map(lambda i: block_scores(qg, kv, i * n, n), jnp.arange(nb))  # [nb,...,n]
        scores = jnp.moveaxis(blocks, 0, -2).reshape(*qg.shape[:4], width)  # [b,k,g,t,width]
    w, total = softmax_parts(scores * jnp.float32(scale) + gbias)  # [b,k,g,t,width], [..,1]
    if nb == 1:
        out = block_output(w, kv, 0, n)  # [b,k,g,t,d]
    else:

        def add_block(i, acc):
            p = lax.dynamic_slice_in_dim(w, i * n, n, axis=-1)  # [b,k,g,t,n]
            return acc + block_output(p, kv, i * n, n)

        out = lax.fori_loop(0, nb, add_block, jnp.zeros(qg.shape, jnp.float32))
    return out / total  # normalising the [t,d] output costs less than the [t,width] scores
