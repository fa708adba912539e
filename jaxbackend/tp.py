"""Tensor parallelism (PAPER.md section 4): the per-rank view of the model and its collectives.

A `Comm` says how this rank talks to the others; the model code is the same for one rank and
many. Per block there are exactly two collectives, both in `model.row_parallel`: the sum of the
attention output projection's partial results and the sum of the MLP down projection's. Every
rank embeds the (replicated) token ids itself, so only ids cross ranks, never embeddings.

The LM head is vocabulary-parallel: rank r computes logits for its slice of the vocabulary only.
- Greedy: each rank offers (best value, its global id); `max` then `min` over ranks pick the
  global argmax with ties to the lowest id: two reductions of b values, never the vocabulary.
- Sampling with top-k: each rank offers its local top-k (value, id); the gathered R*k candidates
  go through the same processors and draw as the single-rank sampler (a token outside every
  rank's top-k is outside the global top-k too, so the result is identical).
- Full logits are gathered only when asked for (sampling without top-k, `return_logits`).

Two transports, one `Comm` class each (`TRANSPORTS`, keyed like `Runtime.transport`):
`AxisComm(R)` inside `shard_map` over the mesh axis "tp" (R XLA devices in one process,
`lax.psum`), and `MpiComm(R)` across R MPI processes (`mpi.py`, the only importer of
mpi4jax/mpi4py). `SINGLE` is the one-rank case: every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from . import mpi
from .sampling import (
    Sampling,
    choose,
    first_argmax,
    process,
    repetition_penalty,
    sample,
    uniform,
)

AXIS = "tp"


@dataclass(frozen=True)
class Comm:
    """One rank alone: every collective is the identity."""

    size: int = 1
    per_process = False  # True: this process holds only its slice of sharded arrays (MPI)

    def rank(self):
        return 0

    def sum(self, x):
        """Sum over ranks (the row-parallel reduction)."""
        return x

    def max(self, x):
        return x

    def min(self, x):
        return x

    def gather(self, x):
        """Every rank's x stacked on a new leading axis [R, ...] (rank order)."""
        return x[None]

    def local_heads(self, bias):
        """This rank's heads of a per-head attention bias [b,h,t,s] (ALiBi); others pass."""
        if self.size == 1 or bias.shape[1] == 1:
            return bias
        n = bias.shape[1] // self.size
        return lax.dynamic_slice_in_dim(bias, self.rank() * n, n, axis=1)


@dataclass(frozen=True)
class AxisComm(Comm):
    """Ranks are the XLA devices of this process, inside `shard_map` over the mesh axis."""

    def rank(self):
        return lax.axis_index(AXIS)

    def sum(self, x):
        return lax.psum(x, AXIS)

    def max(self, x):
        return lax.pmax(x, AXIS)

    def min(self, x):
        return lax.pmin(x, AXIS)

    def gather(self, x):
        return lax.all_gather(x, AXIS)


@dataclass(frozen=True)
class MpiComm(Comm):
    """Ranks are MPI processes, one XLA device each (mpi4jax collectives, `mpi.py`)."""

    per_process = True

    def rank(self):
        return mpi.rank()

    def sum(self, x):
        return mpi.allreduce(x, "sum")

    def max(self, x):
        return mpi.allreduce(x, "max")

    def min(self, x):
        return mpi.allreduce(x, "min")

    def gather(self, x):
        return mpi.allgather(x)


SINGLE = Comm()
TRANSPORTS = {"devices": AxisComm, "mpi": MpiComm}  # Runtime.transport -> its Comm


# ---------------------------------------------------------------- the vocabulary-parallel head
def vocab_offset(comm: Comm, local_vocab: int):
    return comm.rank() * local_vocab


def greedy(local_scores, comm: Comm):
    """Global argmax [b] (lowest id on ties) from each rank's scores [b, v/R]."""
    local_vocab = local_scores.shape[-1]
    best = jnp.max(local_scores, axis=-1)  # [b]
    ids = first_argmax(local_scores) + vocab_offset(comm, local_vocab)
    top = comm.max(best)  # reduction 1: b values
    mine = jnp.where(best == top, ids, jnp.iinfo(jnp.int32).max)
    return comm.min(mine)  # reduction 2: b values


def gather_vocab(local, comm: Comm):
    """Full [b, v] from each rank's [b, v/R] slice (only when full logits are needed)."""
    if comm.size == 1:
        return local
    parts = comm.gather(local)  # [R, b, v/R]
    return jnp.moveaxis(parts, 0, 1).reshape(local.shape[0], -1)


def top_k_candidates(local_scores, k: int, comm: Comm):
    """The global top-k candidates of every row, sorted by id: (scores [b, R*k], ids [b, R*k])."""
    local_vocab = local_scores.shape[-1]
    k = min(k, local_vocab)
    values, idx = lax.top_k(local_scores, k)  # [b,k]
    ids = idx.astype(jnp.int32) + vocab_offset(comm, local_vocab)
    values = jnp.moveaxis(comm.gather(values), 0, 1).reshape(values.shape[0], -1)  # [b, R*k]
    ids = jnp.moveaxis(comm.gather(ids), 0, 1).reshape(ids.shape[0], -1)
    order = jnp.argsort(ids, axis=-1)  # id order, as the single-rank sampler walks the vocabulary
    return jnp.take_along_axis(values, order, -1), jnp.take_along_axis(ids, order, -1)


# ---------------------------------------------------------------- sampling from vocabulary slices


def choose_sharded(logits, sampling, seen, seeds, step, comm: Comm):
    """The single-rank sampler's choice, from vocabulary slices: greedy by a (value, id)
    reduction, top-k sampling from the gathered local top candidates, else from gathered
    logits. Each rank offers `top_k_slots` candidates (a static size >= the traced top_k)."""
    s = Sampling.of(sampling, comm.size)
    scores = logits.astype(jnp.float32)
    if s.penalised:
        scores = repetition_penalty(scores, seen, s.repetition_penalty)
    if s.greedy:
        return greedy(scores, comm)
    u = uniform(seeds, step)

    def from_full(scores):
        full = gather_vocab(scores, comm)
        return choose(process(full, s, None, penalty=False), u)

    if not s.top_k_slots:
        return from_full(scores)
    slots = min(s.top_k_slots, scores.shape[-1])
    cand, ids = top_k_candidates(scores, slots, comm)

    def from_candidates(scores):
        picked = choose(process(cand, s, None, penalty=False), u)
        return jnp.take_along_axis(ids, picked[:, None], -1)[:, 0]

    # Top-k keeps every token tied with the k-th value. The candidates hold the exact global
    # k-th value, but a rank may hold more ties than the slots it offered: then (rarely) gather
    # all.
    index = jnp.clip(s.top_k - 1, 0, cand.shape[-1] - 1)
    kth = jnp.take(-jnp.sort(-cand, axis=-1), index, axis=-1)  # [b]
    more_ties = jnp.any(jnp.sum(scores >= kth[:, None], axis=-1) > slots)
    return lax.cond(comm.max(more_ties.astype(jnp.int32)) > 0, from_full, from_candidates, scores)


def sample_ranked(logits, sampling, seen, seeds, step, comm: Comm):
    """Choose ids [b] from logits [b, v] (or this rank's slice [b, v/R]) and mark them in the
    seen mask of the same layout (for the repetition penalty)."""
    if comm.size == 1:
        ids = sample(logits, sampling, seen, seeds, step)
    else:
        ids = choose_sharded(logits, sampling, seen, seeds, step, comm).astype(jnp.int32)
    return ids, mark_seen(seen, ids, comm)


def mark_seen(seen, ids, comm: Comm):
    """seen [B,v] (this rank's slice [B,v/R] under tp) with ids [b] marked in its first b rows:
    each rank marks the ids in its slice."""
    b = ids.shape[0]
    if comm.size == 1:
        return seen.at[jnp.arange(b), ids].set(True)
    local = ids - vocab_offset(comm, seen.shape[-1])
    local = jnp.where((local >= 0) & (local < seen.shape[-1]), local, seen.shape[-1])
    return seen.at[jnp.arange(b), local].set(True, mode="drop")
