"""SlimAttention in JAX: the reference's `slim_attention.py` with static query blocks and a
branch per number of visible key blocks.

Query-row blocks are unrolled (their size is static: xFT's L2 rule, rounded up to a multiple of
64 rows, a shape XLA's matrix products like; the result does not depend on it). A block's last
visible key column is only known at run time (it depends on the positions), so each block is a
`lax.switch` over static key widths: the branch for width W computes complete score rows
against key slots [0, W), an exact softmax per row and `P @ V` (`key_blocks.exact_rows`), one
large float32 dot each way. At most `MAX_WIDTHS` widths are compiled per block: a block runs the
smallest one that covers what it can see. The few-heads decode path splits the keys into chunks
and merges their (max, sum, output) exactly.

Where the compiled kernels are active (`slimllm.kernels.active()`), the same blocking runs as one
custom call instead (`slimllm.kernels.attention`: threads over (batch, head, query block), each
row multiplied only against the keys it sees), since XLA:CPU's batched dots are neither fast
nor parallel over heads. The kernel takes `mb` and `budget` and picks its own decode chunks
(`key_splits` and `key_block` shape the XLA path only). The code below is the fallback (kernels
off or missing, a float16 cache).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from slimllm.kernels import attention as kernel
from slimllm.reference.slim_attention import L2_BUDGET, block_rows

from .attention import group_bias, group_queries, ungroup
from .key_blocks import block_output, block_scores, exact_rows
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


def row_block(qg, kv: LayerKV, gbias, scale, n: int):
    """Exact attention for a block of query rows over the key slots they can see: the branch of
    the smallest compiled width that covers them: [b,k,g,t,d] -> [b,k,g,t,d]."""
    widths = key_widths(kv.length, n)
    need = last_visible(gbias)
    branch = jnp.searchsorted(jnp.asarray(widths), need)  # the smallest width >= need

    def over(width, qg, gbias):  # the cache is closed over (LayerKV is not a pytree)
        return exact_rows(qg, kv, gbias[..., :width], scale, width, n)

    branches = [functools.partial(over, w) for w in widths]
    return lax.switch(jnp.minimum(branch, len(widths) - 1), branches, qg, gbias)


def split_keys_decode(qg, kv: LayerKV, gbias, scale, splits: int, n: int):
    """Decode over `splits` key chunks of whole key blocks, each with local (m, l, O), merged."""
    nb = kv.length // n
    per = -(-nb // splits)  # key blocks per chunk
    parts = []
    for c in range(0, nb, per):
        lo, size = c * n, min(per, nb - c) * n
        scores = block_scores(qg, kv, lo, size) * jnp.float32(scale)  # [b,k,g,1,size]
        scores = scores + gbias[..., lo : lo + size]
        m = scores.max(axis=-1, keepdims=True)  # [b,k,g,1,size] -> [b,k,g,1,1]
        m_safe = jnp.where(jnp.isfinite(m), m, jnp.float32(0.0))
        w = jnp.exp(scores - m_safe)  # unnormalised weights [b,k,g,1,size]
        l = w.sum(axis=-1, keepdims=True)  # [b,k,g,1,size] -> [b,k,g,1,1]
        o = block_output(w, kv, lo, size) / jnp.where(l > 0, l, jnp.float32(1.0))  # [b,k,g,1,d]
        parts.append((m, l, o))
    m = jnp.max(jnp.stack([m_c for m_c, _, _ in parts]), axis=0)  # -> [b,k,g,1,1]
    weights = [
        l_c * jnp.exp(jnp.where(jnp.isfinite(m_c), m_c - m, -jnp.inf)) for m_c, l_c, _ in parts
    ]
    out = sum(w_c * o_c for w_c, (_, _, o_c) in zip(weights, parts, strict=True))
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
    out = kernel.slim_attention(q, kv, bias, scale, mb, budget)  # None: not the kernel's case
    if out is not None:
        return out
    b, t, h, d = q.shape
    kh = kv.k.shape[1]
    qg = group_queries(q, kh)  # [b,t,h,d] -> [b,k,g,t,d]
    gb = group_bias(bias, kh)  # [b,h|1,t,s] -> [b,k|1,g|1,t,s]
    n = key_block_size(kv, key_block)
    if t == 1 and key_splits > 1:
        out = split_keys_decode(qg, kv, gb, scale, key_splits, n)  # [b,k,g,1,d]
        return ungroup(out).astype(jnp.float32)  # [b,k,g,1,d] -> [b,1,h,d]
    mb = mb or -(-block_rows(t, d, budget) // ROW_MULTIPLE) * ROW_MULTIPLE
    out = [
        row_block(qg[:, :, :, i : i + mb], kv, gb[:, :, :, i : i + mb], scale, n)
        for i in range(0, t, mb)
    ]  # [b,k,g,mb,d] each
    return ungroup(jnp.concatenate(out, axis=3)).astype(jnp.float32)  # -> [b,t,h,d]
