"""MPI transport for tensor parallelism: the only module that imports mpi4py and mpi4jax.

Each process is one rank with one XLA CPU device; collectives inside jitted programs are
mpi4jax calls on COMM_WORLD. Outside jit, `bcast_object` sends the master's token ids and
settings to every rank (the paper's "broadcast ids, not embeddings"), and `abort` ends every
rank when one fails, so no rank is left waiting in a collective.

A rank that fails with an exception says so and aborts the job (cli.main_mpi). A rank that
cannot say anything (stopped, frozen, its machine gone) is caught by the `Heartbeat`: from the
first use of MPI, a thread of every rank tells every other rank, on a communicator of its own,
that it is alive, twice a second; a rank that has heard nothing from another for the bound
(`SLIMLLM_MPI_TIMEOUT` seconds, default 60, or `set_timeout`) prints which rank went silent and
ends the job. The thread runs while the main thread waits inside a collective, because both
mpi4jax (inside XLA) and mpi4py's blocking calls release the GIL. A rank killed outright is
seen by mpiexec itself: MPICH's launcher kills the others at once (SIGKILL, no chance to
report) and prints its "BAD TERMINATION" banner on stdout (see the README for keeping that
out of --json output).

Imports happen where they are used: mpi4py and mpi4jax are an optional extra, and the CLI reads
`launched_size` before jax may be imported (a single process with --tp N must set its XLA
device count first).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from slimllm.reference.errors import SlimllmError

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

    if Heartbeat.running is None and MPI.COMM_WORLD.Get_size() > 1:
        Heartbeat.start(MPI.COMM_WORLD, timeout_from(os.environ))
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


TIMEOUT_VAR = "SLIMLLM_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds a rank may go unheard before the job ends


def timeout_from(environ) -> float:
    """The heartbeat bound in seconds: $SLIMLLM_MPI_TIMEOUT, else DEFAULT_TIMEOUT."""
    text = environ.get(TIMEOUT_VAR, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise SlimllmError(f"{TIMEOUT_VAR}={text!r}: expected a positive number of seconds")
    return seconds


class Heartbeat:
    """One thread per rank: sends "alive" to every other rank every `period` seconds on a
    duplicate of the world communicator (so it never matches the model's messages), receives
    theirs, and aborts the job with a rank-tagged message when one has been silent for
    `timeout` seconds. Stopped before MPI is finalized (atexit runs it first)."""

    running: Heartbeat | None = None
    TAG = 7

    def __init__(self, comm, timeout: float):
        self.comm = comm.Dup()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout = timeout
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="slimllm-heartbeat", daemon=True)

    @classmethod
    def start(cls, comm, timeout: float) -> None:
        cls.running = cls(comm, timeout)
        cls.running.thread.start()
        atexit.register(cls.running.stop)  # after mpi4py's finalizer, so it runs before it

    @property
    def period(self) -> float:
        return min(0.5, self.timeout / 4)

    def run(self) -> None:
        from mpi4py import MPI

        peers = [p for p in range(self.size) if p != self.rank]
        heard = dict.fromkeys(peers, time.monotonic())
        status, byte = MPI.Status(), bytearray(1)
        while not self.done.is_set():
            for p in peers:
                self.comm.Isend([b"+", MPI.BYTE], dest=p, tag=self.TAG).Free()
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=status):
                source = status.Get_source()
                self.comm.Recv([byte, MPI.BYTE], source=source, tag=self.TAG)
                heard[source] = time.monotonic()
            now = time.monotonic()
            silent = [p for p in peers if now - heard[p] > self.timeout]
            if silent:
                self.end(silent)
            self.done.wait(self.period)

    def end(self, silent: list[int]) -> None:
        print(
            f"slimllm: error (rank {self.rank} of {self.size}): rank "
            f"{', '.join(map(str, silent))} has not answered for more than {self.timeout:g} s "
            f"(stopped or frozen?), so the job ends (the bound is ${TIMEOUT_VAR})",
            file=sys.stderr,
            flush=True,
        )
        abort(2)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def set_timeout(seconds: float) -> None:
    """Change the heartbeat bound of this process (from now on)."""
    if not 0 < seconds < float("inf"):
        raise SlimllmError(f"MPI timeout {seconds!r}: expected a positive number of seconds")
    os.environ[TIMEOUT_VAR] = str(seconds)
    if Heartbeat.running is not None:
        Heartbeat.running.timeout = seconds


def bcast_object(obj, root: int = 0):
    """The master's Python object on every rank (token ids, settings: small)."""
    return world().bcast(obj, root=root)


def barrier() -> None:
    world().Barrier()


# Seconds a failing rank waits between printing its last line and aborting. Hydra's proxy
# forwards a rank's output and handles its abort in whichever order they reach it; without
# the pause the job ended with an empty stderr about one time in seven (CI, stop 27).
ABORT_GRACE = 0.5


def abort(code: int = 1) -> None:
    """End every rank of the job now (another rank may be blocked in a collective), once the
    launcher has had time to forward what this rank printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)
    from mpi4py import MPI

    MPI.COMM_WORLD.Abort(code)
