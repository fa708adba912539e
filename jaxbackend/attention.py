"""Naive attention in JAX: the reference's `attention.py` with the key-block loop as `lax.map`.

Scores are materialised in full. A float32 cache is read in one block for prefill (no
conversion), in key blocks for a decode step; other dtypes one key block at a time, widened to
float32 right before the float32 dot (XLA:CPU is fast only for float32 dots), with int8 scales
on score columns and folded into probabilities. `exact_rows` is that computation over the first
`width` key slots; SlimAttention runs it per block of query rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from slimllm.reference.config import ModelConfig

from .kv_cache import KEY_BLOCK, LayerKV
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


def key_blocking(width: int, key_block: int = KEY_BLOCK) -> tuple[int, int]:
    """(number of blocks, block size) to read key slots [0, width): `key_block`-sized blocks
    when longer than one. float32 gains nothing from widening, but reading a decode step's cache
    in blocks too keeps XLA from copying the just-written cache into the attention fusion
    (measured: 5 cache copies per layer at b=1)."""
    n = width if width <= key_block else key_block
    if width % n:
        raise ValueError(f"key range {width} is not a multiple of the key block {n}")
    return width // n, n


def softmax_parts(scores):
    """Unnormalised softmax: (exp(scores - row max), row sum or 1 for an all-masked row)."""
    m = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, jnp.float32(0.0)))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e, jnp.where(total > 0, total, jnp.float32(1.0))


def exact_rows(qg, kv: LayerKV, gbias, scale, width: int, key_block: int = KEY_BLOCK):
    """softmax(q k^T * scale + bias) v over key slots [0, width), all scores materialised:
    qg [b,k,g,t,d], gbias [b,k,g|1,t,width] -> [b,k,g,t,d]. A float32 cache read by more than
    one query row is read whole (one large dot multiplies faster than a loop of small ones);
    otherwise keys are read `key_block` at a time (widened right before each dot)."""
    whole = kv.fmt.wide and qg.shape[3] > 1
    nb, n = (1, width) if whole else key_blocking(width, key_block)
    if nb == 1:
        scores = block_scores(qg, kv, 0, n)
    else:
        blocks = lax.map(lambda i: block_scores(qg, kv, i * n, n), jnp.arange(nb))  # [nb,...,n]
        scores = jnp.moveaxis(blocks, 0, -2).reshape(*qg.shape[:4], width)  # [b,k,g,t,width]
    e, total = softmax_parts(scores * jnp.float32(scale) + gbias)
    if nb == 1:
        out = block_output(e, kv, 0, n)
    else:

        def add_block(i, acc):
            p = lax.dynamic_slice_in_dim(e, i * n, n, axis=-1)
            return acc + block_output(p, kv, i * n, n)

        out = lax.fori_loop(0, nb, add_block, jnp.zeros(qg.shape, jnp.float32))
    return out / total  # normalising the [t,d] output costs less than the [t,width] scores


def naive_attention(q, kv: LayerKV, bias, scale, key_block: int = KEY_BLOCK):
    """softmax(q k^T * scale + bias) v with all scores materialised: q [b,t,h,d] -> [b,t,h,d]."""
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)  # [b,k,g,t,d]
    out = exact_rows(qg, kv, group_bias(bias, kh), scale, kv.length, key_block)
    return ungroup(out).astype(jnp.float32)
