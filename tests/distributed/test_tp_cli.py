"""`slimllm generate --tp N` and `mpiexec -n 2 slimllm generate`: results, output and failures.

A tensor-parallel run must print what a one-rank run prints (rank 0 alone writes stdout), and a
broken setup or a failing rank must end the whole job at once with one clear line, never leave
ranks waiting in a collective (cli.main_mpi, cli.inject_fault, Model.engine, sharding.check_tp).
MPI jobs run as subprocesses in their own session with a timeout, so a hang fails the test
instead of stalling CI and leaves no rank behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tp_cases

from conftest import FIXTURES
from slimllm import SlimllmError
from slimllm.cli import main
from slimllm.jaxbackend import mpi

FAULT_TIMEOUT = 60  # seconds for a failing job to end (it needs about 2)
RUN_TIMEOUT = 300  # seconds for a whole successful 2-rank run (about 15 on CI)
MAX_NEW = "8"


@pytest.fixture(scope="module", autouse=True)
def tp2_in_background(request):
    """test_tp_equivalence's background tp=2 runs start now, on the core this module leaves idle."""
    tp_cases.start_early(request, FIXTURES)


def model_dir() -> Path:
    return FIXTURES / tp_cases.sampled_fixture(tp_cases.allowed_fixtures(FIXTURES))


def generate_args(*extra: str) -> list[str]:
    prompt = tp_cases.load(FIXTURES, model_dir().name)[1][0]
    return [
        "generate",
        "--model",
        str(model_dir()),
        "--ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        MAX_NEW,
        "--no-eos",
        *extra,
    ]


def slimllm_command() -> list[str]:
    """The installed `slimllm` script beside this Python, else the same entry point via -m."""
    script = Path(sys.executable).with_name("slimllm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "slimllm.cli"]


def start_mpi(*argv: str, fault: str | None = None, **env: str) -> subprocess.Popen:
    """`mpiexec -n 2 slimllm ARGV` in its own session (so a timeout can end every rank), with
    the extra environment variables `env`."""
    launcher = tp_cases.mpiexec()
    if launcher is None:
        pytest.skip(tp_cases.MPI_MISSING)
    env = tp_cases.worker_env(**env, **({"SLIMLLM_FAULT": fault} if fault else {}))
    return subprocess.Popen(
        [launcher, "-n", "2", *slimllm_command(), *argv],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(job: subprocess.Popen, timeout: float) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of a started job; fails the test on timeout."""
    t0 = time.perf_counter()
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # mpiexec and the ranks it started
        job.communicate()
        pytest.fail(f"mpiexec did not end within {timeout} s")
    return job.returncode, out, err, time.perf_counter() - t0


def run_main(*argv: str) -> tuple[int, str, str]:
    """cli.main in this process (two XLA devices, see conftest): (code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs():
    """The same greedy generation three ways. The 2-rank job starts first and compiles in the
    background while this process runs --tp 1 and --tp 2 on its two XLA devices."""
    job = start_mpi(*generate_args("--json")) if tp_cases.mpiexec() else None
    results = {tp: run_main(*generate_args("--json", "--tp", str(tp))) for tp in (1, 2)}
    results["mpi"] = finish(job, RUN_TIMEOUT) if job else None
    return results


def test_tp2_devices_prints_what_tp1_prints(runs):
    (code1, out1, err1), (code2, out2, err2) = runs[1], runs[2]
    assert code1 == 0 and code2 == 0, err1 + err2
    one, two = json.loads(out1), json.loads(out2)
    assert (one["tp"], two["tp"]) == (1, 2)
    assert len(one["ids"]) == int(MAX_NEW)
    assert two["ids"] == one["ids"] and two["finish_reason"] == one["finish_reason"]


def test_two_ranks_print_one_json_object_equal_to_tp1(runs):
    if runs["mpi"] is None:
        pytest.skip(tp_cases.MPI_MISSING)
    code, out, err, _ = runs["mpi"]
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1, f"expected rank 0 alone to print:\n{out}"
    result = json.loads(out)
    assert result["tp"] == 2
    assert result["ids"] == json.loads(runs[1][1])["ids"]


@pytest.mark.parametrize("fault", ["1:raise", "1:kill", "0:raise"])
def test_a_failing_rank_ends_the_job(fault):
    rank, kind = fault.split(":")
    code, out, err, seconds = finish(
        start_mpi(*generate_args("--json"), fault=fault), FAULT_TIMEOUT
    )
    assert code != 0, f"SLIMLLM_FAULT={fault}: exit 0 after {seconds:.1f} s\n{out}\n{err}"
    assert "{" not in out  # no result was printed
    if kind == "raise":
        assert f"slimllm: error (rank {rank} of 2): injected fault on rank {rank}" in err, err


def test_a_stopped_rank_ends_the_job_with_a_message():
    """SIGSTOP: the rank is alive but silent, so no launcher notices; rank 0's heartbeat does."""
    code, out, err, seconds = finish(
        start_mpi(*generate_args("--json"), fault="1:stop", SLIMLLM_MPI_TIMEOUT="8"),
        FAULT_TIMEOUT,
    )
    assert code != 0 and "{" not in out, f"exit {code} after {seconds:.1f} s\n{out}\n{err}"
    assert "slimllm: error (rank 0 of 2): rank 1 has not answered for more than 8 s" in err, err


@pytest.mark.parametrize("text", ["soon", "0", "-1", "nan", "inf"])
def test_the_mpi_timeout_must_be_a_positive_number_of_seconds(text):
    assert mpi.timeout_from({}) == mpi.DEFAULT_TIMEOUT
    assert mpi.timeout_from({mpi.TIMEOUT_VAR: "2.5"}) == 2.5
    with pytest.raises(SlimllmError, match=f"SLIMLLM_MPI_TIMEOUT='{text}': expected a positive"):
        mpi.timeout_from({mpi.TIMEOUT_VAR: text})


def test_a_bad_mpi_timeout_is_a_clear_error():
    code, out, err, _ = finish(
        start_mpi(*generate_args(), SLIMLLM_MPI_TIMEOUT="soon"), FAULT_TIMEOUT
    )
    assert code != 0 and out == ""
    assert err.count("slimllm: error: SLIMLLM_MPI_TIMEOUT='soon': expected a positive") == 1, err


def test_the_numpy_backend_is_refused_under_mpiexec():
    """It would run the whole model on every rank."""
    code, out, err, _ = finish(start_mpi(*generate_args("--backend", "numpy")), FAULT_TIMEOUT)
    assert code != 0 and out == ""
    assert err.count("slimllm: error: --backend numpy runs the whole model in one process") == 1


def test_tp_that_does_not_divide_the_heads_is_a_clear_error():
    heads = tp_cases.load(FIXTURES, model_dir().name)[0].cfg.n_heads
    assert heads % 3, "pick a fixture whose heads 3 does not divide"
    code, out, err = run_main(*generate_args("--tp", "3"))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("slimllm: error: ")
    assert f"tp=3 does not divide the {heads} query heads" in err


def test_tp_must_match_the_mpi_job():
    code, out, err, _ = finish(start_mpi(*generate_args("--tp", "4")), FAULT_TIMEOUT)
    assert code != 0 and out == ""
    assert "--tp 4 but mpiexec started 2 ranks: they must match" in err, err


def test_two_ranks_print_help_once():
    code, out, err, _ = finish(start_mpi("generate", "--help"), FAULT_TIMEOUT)
    assert code == 0, err
    assert out.count("usage: slimllm generate") == 1, out
