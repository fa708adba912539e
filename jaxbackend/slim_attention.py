"""SlimAttention in JAX: the reference's `slim_attention.py` with static query blocks and a
branch per number of visible key blocks.

Query-row blocks are unrolled (their size is static: xFT's L2 rule, rounded up to a multiple of
64 rows, a shape XLA's matrix products like; the result does not depend on it). A block's last
visible key column is only known at run time (it depends on the positions), so each block is a
`lax.switch` over static key widths: the branch for width W computes complete score rows
against key slots [0, W), an exact softmax per row and `P @ V` (`attention.exact_rows`), one
large float32 dot each way. At most `MAX_WIDTHS` widths are compiled per block: a block runs the
smallest one that covers what it can see. The few-heads decode path splits the keys into chunks
and merges their (max, sum, output) exactly.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from slimllm.reference.slim_attention import L2_BUDGET, block_rows

from .attention import block_output, block_scores, exact_rows, group_bias, group_queries, ungroup
from .kv_cache import KEY_BLOCK, LayerKV

__all__ = ["L2_BUDGET", "block_rows", "slim_attention"]

MAX_WIDTHS = 8  # compiled key widths per query block (compile time grows with them)
ROW_MULTIPLE = 64  # automatic query blocks are rounded up to this many rows


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


def key_widths(length: int, n: int) -> list[int]:
    """The static key widths compiled per query block: multiples of the key block n, at most
    MAX_WIDTHS of them, the last one the whole cache."""
    blocks = length // n
    step = -(-blocks // MAX_WIDTHS)
    return [min(w, blocks) * n for w in range(step, blocks + step, step)]


def row_block(qg, kv: LayerKV, bias, scale, n: int):
    """Exact attention for a block of query rows over the key slots they can see."""
    widths = key_widths(kv.length, n)
    need = last_visible(bias)
    branch = jnp.searchsorted(jnp.asarray(widths), need)  # the smallest width >= need

    def over(width, qg, bias):  # the cache is closed over (LayerKV is not a pytree)
        return exact_rows(qg, kv, bias[..., :width], scale, width, n)

    branches = [functools.partial(over, w) for w in widths]
    return lax.switch(jnp.minimum(branch, len(widths) - 1), branches, qg, bias)


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
    mb = mb or -(-block_rows(t, d, budget) // ROW_MULTIPLE) * ROW_MULTIPLE
    out = [
        row_block(qg[:, :, :, i : i + mb], kv, gb[:, :, :, i : i + mb], scale, n)
        for i in range(0, t, mb)
    ]
    return ungroup(jnp.concatenate(out, axis=3)).astype(jnp.float32)
