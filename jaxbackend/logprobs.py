"""Log-probabilities of generated tokens in JAX: the reference's `logprobs.py`, also from
vocabulary slices.

The same float32 maths: log p_i = (x_i - m) - log sum_j exp(x_j - m) of the raw logits, read at
the chosen id, and the n most likely ids (by logit, ties to the lowest id). Under tensor
parallelism each rank holds its slice [b, v/R] of the logits (tp.py), and the full vocabulary
is never gathered: m is a `comm.max` and the sum of exps a `comm.sum` of b values each, the
chosen id's logit comes from the rank that holds it (a `comm.sum` of a value masked to zero
elsewhere), and the top-n are the best n of the ranks' local top-n, gathered (R*n per row, as
`tp.top_k_candidates`). A token in the global top n is in its own rank's top n, and ties stay
with the lowest id: `lax.top_k` puts the lower index first among equal values, and the gathered
candidates lie in rank order, so position order is id order.

`token_logprobs` is a plain traceable function (n static), for any compiled program;
`generate.logprobs_fn` wraps it for the stream loop's programs (`choose_fn`, `step_fn`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from slimllm.reference.logprobs import MAX_LOGPROBS, TokenLogprob, check_logprobs, per_row

from .tp import SINGLE, Comm, vocab_offset

__all__ = ["MAX_LOGPROBS", "TokenLogprob", "check_logprobs", "per_row", "token_logprobs"]


def top_candidates(x, n: int, comm: Comm):
    """The global top n (logits [b,n], ids [b,n] int32) from this rank's logits [b, v/R]."""
    local_vocab = x.shape[-1]
    values, idx = lax.top_k(x, min(n, local_vocab))  # [b,v/R] -> [b,k], low index first on ties
    ids = idx.astype(jnp.int32) + vocab_offset(comm, local_vocab)
    if comm.size == 1:
        return values, ids
    values = jnp.moveaxis(comm.gather(values), 0, 1).reshape(x.shape[0], -1)  # [R,b,k] -> [b,R*k]
    ids = jnp.moveaxis(comm.gather(ids), 0, 1).reshape(x.shape[0], -1)  # rank order = id order
    values, pos = lax.top_k(values, n)  # [b,R*k] -> [b,n]
    return values, jnp.take_along_axis(ids, pos, axis=-1)


def token_logprobs(logits, ids, n: int, comm: Comm = SINGLE):
    """(logprob of ids [b], top-n ids [b,n] int32, their logprobs [b,n]) from raw logits [b,v]
    or this rank's slice [b,v/R] (ids [b] global, n static, n <= v)."""
    x = logits.astype(jnp.float32)
    b, local_vocab = x.shape
    m = comm.max(jnp.max(x, axis=-1))  # [b,v/R] -> [b]
    log_sum = jnp.log(comm.sum(jnp.sum(jnp.exp(x - m[:, None]), axis=-1)))  # [b,v/R] -> [b]
    local = ids.astype(jnp.int32) - vocab_offset(comm, local_vocab)  # [b]
    mine = (local >= 0) & (local < local_vocab)
    picked = jnp.take_along_axis(x, jnp.clip(local, 0, local_vocab - 1)[:, None], axis=-1)[:, 0]
    picked = comm.sum(jnp.where(mine, picked, 0.0))  # [b]: the holding rank's logit
    chosen = (picked - m) - log_sum
    if n == 0:
        return chosen, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
    values, top = top_candidates(x, n, comm)  # [b,n]
    return chosen, top, (values - m[:, None]) - log_sum[:, None]
