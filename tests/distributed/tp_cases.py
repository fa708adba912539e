"""The cases of the tensor-parallel equivalence tests, and the background runs that compute them.

tp=1 and tp=2 must give the same greedy ids and logits (float32 order of summation aside) and the
same seeded samples (PAPER.md section 4). `test_tp_equivalence.py` computes tp=1 in the pytest
process and compares it with two background runs of `tp_worker.py` over the very same cases:
tp=2 on two XLA devices of one process, and tp=2 across the ranks of `mpiexec -n 2`. All three
import this module, so the sides cannot drift apart.

Every distinct (model, attention, cache, sampling, shape) compiles its own programs (a few
seconds each on CI's two cores, four times over: tp=1, devices and two MPI ranks), so the plan is
a covering, not the full product:
- each fixture whose heads allow tp=2 (sharding.check_tp), one per distinct config structure
  (`allowed_fixtures`), runs one greedy case with logits; the six (attention, cache, weights)
  combinations are dealt out in turn, so each runs on one or two families and every weight format
  is split with its scales. SLIMLLM_TP_FULL=1 runs every pair on
  every family (slow: for a thorough local check).
- sampling acts on logits only, so the two sampling settings run on one fixture, in both
  generation modes; the stream cases reuse that fixture's greedy prefill and decode programs.
Greedy in loop mode is covered by test_tp_cli.py (the CLI's --json runs use it).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

MAX_NEW = 10  # tokens per row: enough decode steps through the cache, cheap to run
SEEDS = (11, 12)  # one seed per row (prompt_a, prompt_b)
COMBOS = (  # (attention, kv cache, weight format), alternating every axis
    ("naive", "float32", "float32"),
    ("slim", "int8", "int8"),
    ("flash", "float32", "bfloat16"),
    ("naive", "int8", "int4"),
    ("slim", "float32", "float16"),
    ("flash", "int8", "int8"),
)
SAMPLINGS = {
    # the top-k path: each rank offers its local top-k, the R*k candidates are merged
    "topk": dict(temperature=0.8, top_k=8, top_p=0.9, repetition_penalty=1.3),
    # no top-k: the full-logits gather path
    "topp": dict(temperature=1.0, top_p=0.9),
}


@dataclass(frozen=True)
class Case:
    fixture: str
    attention: str
    kv_dtype: str
    weights: str = "float32"
    sampling: str = "greedy"  # "greedy" or a key of SAMPLINGS
    mode: str = "stream"  # "stream" (host sees every token; logits) or "loop" (one program)
    kernels: str = "auto"  # Runtime.kernels: "fast" stores bfloat16 weights in pair order

    @property
    def key(self) -> str:
        parts = (self.attention, self.kv_dtype, self.weights, self.sampling, self.mode)
        fast = ("fast",) if self.kernels == "fast" else ()
        return "-".join((self.fixture, *parts, *fast))

    @property
    def with_logits(self) -> bool:
        return self.sampling == "greedy" and self.mode == "stream"

    def __str__(self) -> str:
        return self.key


# Config fields that are only numbers inside the same program: two configs that differ in
# nothing else take the same tensor-parallel code paths.
CONSTANTS = ("norm_eps", "rope_theta", "max_len")


def allowed_fixtures(fixtures: Path, tp: int = 2) -> list[str]:
    """Fixture names whose config splits over tp ranks (sharding.check_tp decides), one per
    distinct structure: the tensor-parallel code sees only the config and the weights' shapes,
    so fixtures whose configs differ at most in CONSTANTS (baichuan13b and baichuan2_13b differ
    only in how their checkpoints are read; glm is chatglm3 with another norm_eps) would test
    the same code again at the price of four more compiles of each program."""
    from slimllm.jaxbackend.sharding import check_tp
    from slimllm.weights import load_config

    names = {}
    for path in sorted(fixtures.glob("*")):
        if not (path / "oracle.npz").exists():
            continue
        cfg = load_config(path)
        try:
            check_tp(cfg, tp)
        except ValueError:
            continue
        structure = tuple(
            (f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name not in CONSTANTS
        )
        names.setdefault(structure, path.name)
    return list(names.values())


def plan(fixtures: Path) -> list[Case]:
    """All cases, greedy first (see the module docstring for the choice)."""
    names = allowed_fixtures(fixtures)
    if os.environ.get("SLIMLLM_TP_FULL"):
        greedy = [Case(n, *combo) for n in names for combo in COMBOS]
    else:
        greedy = [Case(n, *COMBOS[i % len(COMBOS)]) for i, n in enumerate(names)]
    if not names:
        return greedy
    first = next(c for c in greedy if c.fixture == sampled_fixture(names))
    # kernels "fast" on bfloat16 weights: where the CPU has the columns road, each rank's
    # weights in pair order (a mesh shards the global layout, an MPI rank lays out its slice)
    paired = next(c for c in greedy if c.weights == "bfloat16")
    greedy.append(
        Case(paired.fixture, paired.attention, paired.kv_dtype, "bfloat16", kernels="fast")
    )
    return greedy + [
        Case(first.fixture, first.attention, first.kv_dtype, first.weights, s, mode)
        for s in SAMPLINGS
        for mode in ("loop", "stream")
    ]


def sampled_fixture(names: list[str]) -> str:
    """The fixture of the sampling cases (sampling sees only logits, so one family will do)."""
    return names[len(names) // 2]


@functools.cache
def load(fixtures: Path, name: str):
    """(model, [prompt_a, prompt_b]) of a fixture, loaded once per process (so its engines and
    compiled programs are shared by every test that uses it)."""
    import slimllm

    oracle = np.load(fixtures / name / "oracle.npz")
    prompts = [oracle["prompt_a"].tolist(), oracle["prompt_b"].tolist()]
    return slimllm.load(fixtures / name), prompts


def run(fixtures: Path, case: Case, tp: int) -> dict[str, np.ndarray]:
    """Generate one case through the public API -> {"ids": [b, n], "logits": [b, n, v]?}.
    Under mpiexec the model splits over the job's ranks whatever tp says (Model.engine)."""
    import slimllm

    model, prompts = load(fixtures, case.fixture)
    out = slimllm.generate(
        model,
        ids=prompts,
        max_new_tokens=MAX_NEW,
        eos_ids=(),
        seed=list(SEEDS),
        attention=case.attention,
        kv_dtype=case.kv_dtype,
        weights=case.weights,
        mode=case.mode,
        kernels=case.kernels,
        return_logits=case.with_logits,
        tp=tp,
        **SAMPLINGS.get(case.sampling, {}),
    )
    result = {"ids": np.array(out.ids, np.int64)}  # every row runs MAX_NEW steps (no EOS)
    if case.with_logits:
        result["logits"] = np.stack(out.logits)
    return result


# ---------------------------------------------------------------- background workers

MPI_MISSING = "mpiexec or mpi4jax not installed (dev/install.sh installs them; CI runs these)"
WORKER = Path(__file__).with_name("tp_worker.py")
WORKER_TIMEOUT = 900  # seconds for a whole worker run; about a minute on CI


def mpiexec() -> str | None:
    """mpiexec next to this Python (the venv's mpich), when the MPI stack is installed."""
    import importlib.util

    path = Path(sys.executable).parent / "mpiexec"
    found = all(importlib.util.find_spec(m) for m in ("mpi4py", "mpi4jax"))
    return str(path) if path.exists() and found else None


def worker_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a child with `devices` XLA CPU devices (an MPI rank has
    one, as in production; conftest forced two on the pytest process), without SLIMLLM_FAULT."""
    env = {k: v for k, v in os.environ.items() if k != "SLIMLLM_FAULT"}
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    # MPICH: a rank waiting in a collective yields its core instead of spinning on it; these
    # tests run more processes than CI has cores (pytest, the devices worker, both ranks).
    yields = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    return env | {"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"} | yields | extra


class Job:
    """One tp_worker.py run in the background, in its own session so a timeout can end it and
    every process it started; its outputs are OUTDIR/{label}.npz."""

    def __init__(self, cmd: list[str], env: dict, outdir: Path, labels: list[str]):
        self.outdir, self.labels, self.outcome = outdir, labels, None
        self.log = open(outdir / f"{labels[0]}.log", "w+")  # noqa: SIM115 - read after the run
        self.process = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=self.log, start_new_session=True
        )
        self.command = " ".join(Path(c).name for c in cmd[:-2])

    def results(self) -> list[dict]:
        """Each label's {"{case}:ids": ..., "{case}:logits": ...}; raises RuntimeError with the
        worker's output when it failed or timed out."""
        if self.outcome is None:
            try:
                code = self.process.wait(timeout=WORKER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                code = f"killed after {WORKER_TIMEOUT} s"
            if code == 0:
                self.outcome = [
                    dict(np.load(self.outdir / f"{label}.npz")) for label in self.labels
                ]
            else:
                self.log.seek(0)
                tail = self.log.read()[-4000:]
                self.outcome = RuntimeError(f"{self.command}: exit {code}\n{tail}")
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # this job's session only
            self.process.wait()


@functools.cache
def background(fixtures: Path) -> dict[str, Job]:
    """Start the tp=2 runs of every case, once per process (whichever module asks first):
    "devices" (one process, two XLA devices) and, when the MPI stack is installed, "mpi"
    (`mpiexec -n 2`, one device per rank). They compile on the other core meanwhile."""
    import atexit
    import shutil
    import tempfile

    outdir = Path(tempfile.mkdtemp(prefix="slimllm-tp-"))
    worker = [sys.executable, str(WORKER), str(fixtures), str(outdir)]
    jobs = {"devices": Job(worker, worker_env(devices=2), outdir, ["devices"])}
    if launcher := mpiexec():
        jobs["mpi"] = Job([launcher, "-n", "2", *worker], worker_env(), outdir, ["rank0", "rank1"])

    def cleanup():
        for job in jobs.values():
            job.kill()
            job.log.close()
        shutil.rmtree(outdir, ignore_errors=True)

    atexit.register(cleanup)
    return jobs


def start_early(request, fixtures: Path) -> None:
    """Start `background` now when this session will compare its results (test_tp_equivalence is
    selected), so it uses the core the calling module leaves idle; else do nothing."""
    if any("test_tp_equivalence" in item.nodeid for item in request.session.items):
        background(fixtures)
