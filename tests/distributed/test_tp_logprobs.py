"""Token logprobs under tensor parallelism: tp=2 == tp=1, on two XLA devices and two MPI ranks.

Each rank holds a vocabulary slice of the logits; `jaxbackend.logprobs.token_logprobs` reduces
the log-sum-exp and the chosen logit over ranks and merges the ranks' top-n (ties to the lowest
id, also across the slice boundary). Checked on drawn logits (ties, huge and tiny values) through
the Engine's `logprobs_fn` program (LAYOUTS, shard_map), whose collectives move b or R*n values
per row, never the vocabulary; and through `generate(logprobs=n)` on stories260K. The MPI side
is this file run as a script under `mpiexec -n 2`, started first, in the background.

    mpiexec -n 2 python test_tp_logprobs.py OUTDIR   (rank 0 writes OUTDIR/mpi.npz)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tp_cases

STORIES = Path(__file__).resolve().parents[1] / "data" / "models" / "stories260K"
V = 96  # vocabulary of the drawn logits: two slices of 48
FN_CASES = [(kind, n) for kind in ("normal", "ties", "huge", "tiny") for n in (0, 1, 7, 20, 60)]
PROMPTS = [[1, 403, 407, 261], [1, 66, 30]]
GENERATE = dict(ids=PROMPTS, max_new_tokens=6, eos_ids=(), cache_len=256, logprobs=5)
MPI_TIMEOUT = 300  # seconds for the whole MPI run (about 15 on two cores)


def drawn(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits [4, V] float32, chosen ids [4]): ties fall on both sides of the slice boundary."""
    rng = np.random.default_rng(7)
    normal = rng.standard_normal((4, V))
    logits = {
        "normal": normal * 3,
        "ties": rng.integers(-1, 2, (4, V)),
        "huge": normal * 1e37,
        "tiny": normal * 1e-30,
    }[kind].astype(np.float32)
    return logits, np.array([0, V // 2 - 1, V // 2, V - 1])


def generated(out) -> dict[str, np.ndarray]:
    """An Output's ids [b,n], chosen logprobs [b,n], top ids and logprobs [b,n,k] as arrays."""
    return {
        "ids": np.array(out.ids),
        "chosen": np.array([[s.logprob for s in row] for row in out.logprobs]),
        "top": np.array([[[i for i, _ in s.top] for s in row] for row in out.logprobs]),
        "top_lp": np.array([[[lp for _, lp in s.top] for s in row] for row in out.logprobs]),
    }


def assert_same(got: dict, want: dict, rtol: float, where: str) -> None:
    """Identical ids (chosen and alternatives), logprobs within rtol."""
    from slimllm.conformance.tolerances import assert_close

    for key in sorted(want):
        if want[key].dtype.kind in "iu":
            assert got[key].tolist() == want[key].tolist(), f"{where}: {key} differ"
        elif want[key].size:
            assert_close(got[key], want[key], rtol, f"{where}: {key}")


def single(kind: str, n: int) -> dict[str, np.ndarray]:
    """tp=1: the function on one rank."""
    import jax

    from slimllm.jaxbackend.logprobs import token_logprobs

    logits, ids = drawn(kind)
    out = jax.jit(token_logprobs, static_argnums=2)(logits, ids, n)
    return dict(zip(("chosen", "top", "top_lp"), (np.asarray(a) for a in out), strict=True))


# ---------------------------------------------------------------- the MPI side (a script)


def mpi_main(outdir: Path) -> None:
    """Every function case on this rank's slice (MpiComm), and generate on stories260K."""
    import jax

    import slimllm
    from slimllm.jaxbackend import mpi
    from slimllm.jaxbackend.logprobs import token_logprobs
    from slimllm.jaxbackend.tp import MpiComm

    rank, half = mpi.rank(), V // 2
    results = {}
    try:
        for kind, n in FN_CASES:
            logits, ids = drawn(kind)
            local = logits[:, rank * half : (rank + 1) * half]
            fn = jax.jit(token_logprobs, static_argnums=(2, 3))
            out = fn(local, ids, n, MpiComm(2))
            for name, a in zip(("chosen", "top", "top_lp"), out, strict=True):
                results[f"{kind}:{n}:{name}"] = np.asarray(a)
        out = slimllm.generate(slimllm.load(STORIES / "stories260K.bin"), **GENERATE)
        results |= {f"generate:{k}": a for k, a in generated(out).items()}
    except BaseException:  # noqa: BLE001 - under MPI any failure must end every rank
        import traceback

        print(f"rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        mpi.abort(1)
        raise
    if rank == 0:
        np.savez(outdir / "mpi.npz", **results)
    mpi.barrier()


@pytest.fixture(scope="module")
def mpi_run():
    """The MPI job, started before this module's other tests (it compiles on the other core);
    yields a function waiting for its results (skips when the MPI stack is absent)."""
    launcher = tp_cases.mpiexec()
    if launcher is None:
        yield lambda: pytest.skip(tp_cases.MPI_MISSING)
        return
    outdir = Path(tempfile.mkdtemp(prefix="slimllm-logprobs-"))
    log = open(outdir / "log", "w+")  # noqa: SIM115 - read after the run
    cmd = [launcher, "-n", "2", sys.executable, __file__, str(outdir)]
    job = subprocess.Popen(
        cmd, env=tp_cases.worker_env(), stdout=log, stderr=log, start_new_session=True
    )

    def results() -> dict[str, np.ndarray]:
        try:
            code = job.wait(timeout=MPI_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)  # this job's session only
            code = f"killed after {MPI_TIMEOUT} s"
        log.seek(0)
        assert code == 0, f"mpiexec -n 2: exit {code}\n{log.read()[-4000:]}"
        return dict(np.load(outdir / "mpi.npz"))

    yield results
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    log.close()


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def engine2(mpi_run):
    """A tp=2 Engine on this process's two XLA devices, to run `logprobs_fn` (the model's weights
    are never used: the program reads only the logits given)."""
    from slimllm.api import demo_model
    from slimllm.jaxbackend.engine import Engine
    from slimllm.reference.config import ModelConfig
    from slimllm.reference.runtime import Runtime

    cfg = ModelConfig(
        vocab=V, width=8, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, ffn_width=8, max_len=16
    )
    return Engine(demo_model(cfg).params, cfg, Runtime(tp=2))


@pytest.mark.parametrize("kind, n", FN_CASES)
def test_two_devices_equal_one_rank(engine2, kind, n):
    from slimllm.conformance.tolerances import FUNCTION
    from slimllm.jaxbackend.generate import logprobs_fn

    logits, ids = drawn(kind)
    out = engine2.run(logprobs_fn, {"n": n}, (), logits, ids)
    got = dict(zip(("chosen", "top", "top_lp"), (np.asarray(a) for a in out), strict=True))
    assert_same(got, single(kind, n), FUNCTION["float32"], "tp=2 devices")


def test_two_devices_move_no_vocabulary(engine2):
    """The compiled tp=2 program's collectives: b values (max, sums) and R*n candidates per
    row (values and ids, which XLA may combine into one), far from the b*v/R logits."""
    from test_tp_collectives import collectives

    from slimllm.jaxbackend.generate import logprobs_fn
    from slimllm.jaxbackend.sharding import LAYOUTS

    n, (logits, ids) = 7, drawn("normal")
    engine2.run(logprobs_fn, {"n": n}, (), logits, ids)
    program = next(c.program for key, c in engine2.programs.items() if key[1] == (("n", n),))
    args = engine2.place((logits, ids), LAYOUTS["logprobs_fn"][0])
    found = collectives(program.lower(*args).compile().as_text())
    assert found, "no collectives: is the program really split over the ranks?"
    assert max(c.elements for c in found) <= 2 * (4 * 2 * n) < 4 * V // 2, found


def test_mpi_ranks_equal_one_rank(mpi_run):
    from slimllm.conformance.tolerances import FUNCTION

    results = mpi_run()
    for kind, n in FN_CASES:
        got = {k: results[f"{kind}:{n}:{k}"] for k in ("chosen", "top", "top_lp")}
        assert_same(got, single(kind, n), FUNCTION["float32"], f"MPI {kind} n={n}")


def test_generate_tp2_equals_tp1(mpi_run, stories):
    """generate(logprobs=5) on stories260K: tp=2 on devices and MPI ranks == tp=1."""
    import slimllm
    from slimllm.conformance.tolerances import MODEL

    model, _ = stories
    want = generated(slimllm.generate(model, **GENERATE))
    got = generated(slimllm.generate(model, tp=2, **GENERATE))
    assert_same(got, want, MODEL["float32"], "tp=2 devices")
    results = mpi_run()
    got = {k.split(":", 1)[1]: a for k, a in results.items() if k.startswith("generate:")}
    assert_same(got, want, MODEL["float32"], "tp=2 MPI")


if __name__ == "__main__":
    mpi_main(Path(sys.argv[1]))
