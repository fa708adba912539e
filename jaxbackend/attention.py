"""Naive attention in JAX: the reference's `attention.py` with the key-block loop as `lax.map`.

Scores are materialised in full; a float32 cache is read in one block (no conversion), other
dtypes one key block at a time, widened to float32 right before the float32 dot (XLA:CPU is
fast only for float32 dots), with int8 scales on score columns and folded into probabilities.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from slimllm.reference.config import ModelConfig

from .kv_cache import KEY_BLOCK, LayerKV
from .ops import softmax
from .positions import Positions, alibi_slopes


def visible(pos: Positions, s: int):
    """Mask [b,t,s]: key slot j is visible to the query at slot i if j <= i or j < prefix."""
    j = jnp.arange(s)[None, None, :]
    return (j <= pos.slots[:, :, None]) | (j < pos.prefix[:, None, None])


def attention_bias(cfg: ModelConfig, pos: Positions, s: int):
    """Additive bias [b,h|1,t,s]: 0 or -inf from the mask, plus ALiBi slope * (j - i)."""
    mask = visible(pos, s)[:, None]  # [b,1,t,s]
    bias = jnp.where(mask, jnp.float32(0.0), jnp.float32(-jnp.inf))
    if cfg.pos == "alibi":
        rel = jnp.arange(s)[None, None, :] - pos.slots[:, :, None]  # [b,t,s]
        slopes = jnp.asarray(alibi_slopes(cfg.n_heads))[None, :, None, None]  # [1,h,1,1]
        bias = bias + slopes * rel[:, None].astype(jnp.float32)  # [b,h,t,s]
    return bias


def group_bias(bias, k: int):
    b, h, t, s = bias.shape
    return bias.reshape(b, k, h // k, t, s) if h > 1 else bias[:, :, None]


def group_queries(q, k: int):
    """[b,t,h,d] -> [b,k,g,t,d]."""
    b, t, h, d = q.shape
    return q.reshape(b, t, k, h // k, d).transpose(0, 2, 3, 1, 4)


def ungroup(out):
    """[b,k,g,t,d] -> [b,t,h,d]."""
    b, k, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)


def block_scores(qg, kv: LayerKV, a, n: int):
    """Raw scores [b,k,g,t,n] against key slots [a, a+n) (K scale applied)."""
    s = jnp.einsum("bkgtd,bknd->bkgtn", qg, kv.keys(a, n))
    if kv.k_scale is not None:
        s = s * kv.key_scales(a, n)[:, :, None, None, :]
    return s


def block_output(p, kv: LayerKV, a, n: int):
    """sum over key slots [a, a+n) of p * V (V scale folded into p): -> [b,k,g,t,d]."""
    if kv.v_scale is not None:
        p = p * kv.value_scales(a, n)[:, :, None, None, :]
    return jnp.einsum("bkgtn,bknd->bkgtd", p, kv.values(a, n))


def key_blocking(kv: LayerKV, key_block: int = KEY_BLOCK) -> tuple[int, int]:
    """(number of blocks, block size): `key_block`-sized blocks for caches longer than one.
    float32 gains nothing from widening, but reading it in blocks too keeps XLA from copying the
    just-written cache into the attention fusion (measured: 5 cache copies per layer at b=1)."""
    s = kv.length
    n = s if s <= key_block else key_block
    if s % n:
        raise ValueError(f"cache length {s} is not a multiple of the key block {n}")
    return s // n, n


def naive_attention(q, kv: LayerKV, bias, scale, key_block: int = KEY_BLOCK):
    """softmax(q k^T * scale + bias) v with all scores materialised: q [b,t,h,d] -> [b,t,h,d]."""
    kh, s = kv.k.shape[1], kv.length
    qg = group_queries(q, kh)  # [b,k,g,t,d]
    nb, n = key_blocking(kv, key_block)
    if nb == 1:
        scores = block_scores(qg, kv, 0, n)
    else:
        blocks = lax.map(lambda i: block_scores(qg, kv, i * n, n), jnp.arange(nb))  # [nb,...,n]
        scores = jnp.moveaxis(blocks, 0, -2).reshape(*qg.shape[:4], s)  # [b,k,g,t,s]
    probs = softmax(scores * jnp.float32(scale) + group_bias(bias, kh), axis=-1)
    if nb == 1:
        out = block_output(probs, kv, 0, n)
    else:

        def add_block(i, acc):
            p = lax.dynamic_slice_in_dim(probs, i * n, n, axis=-1)
            return acc + block_output(p, kv, i * n, n)

        out = lax.fori_loop(0, nb, add_block, jnp.zeros(qg.shape, jnp.float32))
    return ungroup(out).astype(jnp.float32)
