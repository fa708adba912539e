"""What every fuzz target and hostile-file test asserts, and how a case is bounded.

A mutated file must end in one of two ways: a clean `SlimllmError` (any other exception fails
the test: it would reach a user as a traceback), or a model identical to the original (a
mutation that changed nothing that matters). `outcome` runs a load and says which, within a
time and memory bound per case; `same` compares two loaded results exactly. Cases that could
take the process down (deep pickles, hash bombs, huge declared sizes) run in a child process
under `bounded`, which enforces a wall time and an address-space cap and reports the child's
peak resident memory.
"""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from slimllm.reference.errors import SlimllmError

CASE_SECONDS = 10.0  # every case `outcome` runs ends within this (a tiny model: ~0.1 s)
CASE_MB = 200  # and holds at most this much more resident memory at its peak


def outcome(load, *args, **kwargs):
    """(None, result) when load succeeds, (error message, None) when it raises SlimllmError;
    anything else propagates and fails the calling test, and so does a case that takes longer
    than CASE_SECONDS or peaks more than CASE_MB above the memory resident when it began."""
    reset_peak()
    start, resident = time.perf_counter(), status_kb("VmRSS")
    try:
        message, result = None, load(*args, **kwargs)
    except SlimllmError as e:
        message, result = str(e), None
        assert message and "\n" not in message.strip(), f"not a one-line message: {message!r}"
    seconds, extra_mb = time.perf_counter() - start, (status_kb("VmHWM") - resident) / 1024
    assert seconds < CASE_SECONDS, f"the case took {seconds:.1f} s ({message})"
    assert extra_mb < CASE_MB, f"the case peaked {extra_mb:.0f} MB above its start ({message})"
    return message, result


def status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Start VmHWM (peak resident memory) again from the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def same(a, b) -> bool:
    """Two loaded trees (dicts, lists, tuples, dataclasses, arrays, scalars) exactly equal."""
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


@dataclass
class Bounded:
    returncode: int | None  # None: killed at the time limit; negative: killed by a signal
    seconds: float  # wall time, less the interpreter's start-up
    peak_mb: float  # the child's peak resident memory
    stdout: str
    stderr: str


STARTUP = "import slimllm.weights"


@functools.cache
def startup_seconds() -> float:
    """Wall time of a child that only imports slimllm.weights: what `bounded` does not count."""
    return bounded(STARTUP, seconds=60.0, subtract=0.0).seconds


# Run first in the child: the address-space cap (set here, not in a preexec_fn, so the parent
# need not fork a copy of itself), and a report of the child's own peak RSS at exit. VmHWM is
# the high-water mark of the process image since exec; the rusage ru_maxrss would also count
# the forked parent's pages (hundreds of MB inside a pytest process that has imported JAX).
PRELUDE = """\
import atexit, resource
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
def _report_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open({path!r}, "w").write(line.split()[1])
atexit.register(_report_peak)
"""


def bounded(
    code: str, seconds: float = 2.0, address_gb: float = 4.0, subtract: float | None = None
) -> Bounded:
    """Run `python -c code` in a child with at most `address_gb` of address space (so a memory
    bomb fails instead of swapping the machine), killed once it has run `seconds` past the
    interpreter's start-up (`startup_seconds`). Returns how it ended, its time less start-up,
    and its peak RSS (its own VmHWM, reported at exit; from rusage, an overestimate, when it
    died without exiting), for the test to assert both bounds."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    startup = startup_seconds() if subtract is None else subtract
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.TemporaryDirectory() as scratch,
    ):
        peak_file = os.path.join(scratch, "peak_kb")
        prelude = PRELUDE.format(limit=int(address_gb * 2**30), path=peak_file)
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", prelude + code], stdout=out, stderr=err, env=env
        )
        try:
            returncode = child.wait(timeout=seconds + startup)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            returncode = None
        elapsed = time.perf_counter() - start - startup
        if os.path.exists(peak_file):
            with open(peak_file) as f:
                peak_mb = int(f.read()) / 1024
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        out.seek(0)
        err.seek(0)
        return Bounded(returncode, elapsed, peak_mb, out.read(), err.read())
