"""MPI transport for tensor parallelism: the only module that imports mpi4py and mpi4jax.

Each process is one rank with one XLA CPU device; collectives inside jitted programs are
mpi4jax calls on COMM_WORLD. Outside jit, `bcast_object` sends the master's token ids and
settings to every rank (the paper's "broadcast ids, not embeddings"), and `abort` ends every
rank when one fails, so no rank is left waiting in a collective.

Imports happen where they are used: mpi4py and mpi4jax are an optional extra, and the CLI reads
`launched_size` before jax may be imported (a single process with --tp N must set its XLA
device count first).
"""

from __future__ import annotations

import os
import sys

WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


def launched_size() -> int:
    """World size announced by mpiexec through the environment (1 when not under MPI),
    read without importing mpi4py."""
    for var in WORLD_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def rank() -> int:
    return world().Get_rank()


def size() -> int:
    return world().Get_size()


def allreduce(x, op: str):
    import mpi4jax
    from mpi4py import MPI

    return mpi4jax.allreduce(
        x, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op], comm=world()
    )


def allgather(x):
    """Every rank's x stacked [R, ...], as a sum of one-hot slots: an allreduce, because
    mpi4jax's allgather carries an ordered effect that ahead-of-time compiled programs reject.
    Used only for small tensors (top-k candidates) or when full logits are asked for."""
    import jax.numpy as jnp

    slots = jnp.zeros((size(), *x.shape), x.dtype).at[rank()].set(x)
    return allreduce(slots, "sum")


def bcast_object(obj, root: int = 0):
    """The master's Python object on every rank (token ids, settings: small)."""
    return world().bcast(obj, root=root)


def barrier() -> None:
    world().Barrier()


def abort(code: int = 1) -> None:
    """End every rank of the job now (another rank may be blocked in a collective)."""
    sys.stdout.flush()
    sys.stderr.flush()
    world().Abort(code)
