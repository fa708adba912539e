"""SlimAttention as a compiled kernel (`src/attention.cc`): exact attention of each block of query
rows against the cache's key slots they can see, threads over (batch, head, block); decode
splits each kv head's keys into chunks merged by their (max, sum, output).

`slim_attention(q, kv, bias, scale, mb)` returns None where the kernel does not apply (kernels
off or missing, a cache format it does not read), and the caller takes the XLA path
(`jaxbackend/slim_attention.py`). It reads the cache as stored (float32, bfloat16, or int8 with
one scale per token per head) and the additive bias [b,h|1,t,s] as the model builds it, so every
mask kind (causal, ALiBi, prefix-LM, rows that see nothing) is the definition's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.reference.slim_attention import L2_BUDGET, block_rows

from . import active, target

# The kernel's numbering of the cache formats it reads (src/attention.cc, enum Storage).
STORAGE = {"float32": 0, "bfloat16": 1, "int8": 2}


def block(t: int, d: int, s: int, budget: int = L2_BUDGET) -> int:
    """Query rows per block: xFT's L2 rule (the reference's `block_rows`), capped so that a
    block's score rows over s keys take at most half the budget. The rule keeps t >= 2048
    (d = 128) in one block, whose t x s scores would spill to memory three times per head."""
    cap = max(16, budget // 2 // max(s, 1))
    return max(1, min(block_rows(t, d, budget), cap))


def slim_attention(q, kv, bias, scale, mb: int | None = None, budget: int = L2_BUDGET):
    """q [b,t,h,d] over a cache layer (LayerKV) -> [b,t,h,d] float32, or None where the kernel
    does not apply."""
    t, d, s = q.shape[1], q.shape[3], kv.length
    return attention(q, kv, bias, scale, block=mb or block(t, d, s, budget), chunks=0)


def naive_attention(q, kv, bias, scale):
    """The definition, softmax(q kᵀ · scale + bias) · v with every score row complete: the
    kernel with one block of all t query rows and each kv head's keys in one chunk (no merge).
    q [b,t,h,d] -> [b,t,h,d] float32, or None where the kernel does not apply."""
    return attention(q, kv, bias, scale, block=q.shape[1], chunks=1)


def attention(q, kv, bias, scale, block: int, chunks: int):
    """The custom call: query rows in blocks of `block`, decode keys in at most `chunks` chunks
    per (batch, kv head) (0: as many as keep the threads busy). None where it does not apply."""
    if not active() or kv.fmt.name not in STORAGE:
        return None
    b, t, h, d = q.shape
    s = kv.length
    hb = bias.shape[1]  # 1 or h
    unread = jnp.zeros((1, 1, 1), jnp.float32)  # the format has no scales
    scales = (kv.k_scale, kv.v_scale) if kv.fmt.scaled else (unread, unread)  # [b,k,s]
    call = jax.ffi.ffi_call(
        target("slimllm_attention"),
        jax.ShapeDtypeStruct((b, t, h, d), jnp.float32),
        vmap_method="sequential",
    )
    return call(
        q.astype(jnp.float32),  # [b,t,h,d]
        kv.k,  # [b,k,s,d] as stored
        kv.v,
        *(x.astype(jnp.float32) for x in scales),
        jnp.broadcast_to(bias, (b, hb, t, s)).astype(jnp.float32),  # [b,h|1,t,s]
        scale=np.float32(scale),
        block=np.int64(max(block, 1)),
        chunks=np.int64(chunks),
        storage=np.int32(STORAGE[kv.fmt.name]),
    )
