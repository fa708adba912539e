"""Run a kernel test module's checks again on another instruction-set path, in a process of its
own (the path is chosen once per process: `SLIMLLM_KERNELS_ISA=<tier>` caps it at that tier,
e.g. `portable`, or `avx512-bf16` for no AMX)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from slimllm import kernels

# The library is built by the package's own build, so a kernel test fails where it is missing:
# a silent build failure must not turn into a green run that skipped every kernel. Only a run
# that turned the kernels off on purpose (SLIMLLM_KERNELS=off) skips them.
needs_library = pytest.mark.skipif(
    kernels.why_unavailable() == kernels.TURNED_OFF, reason="SLIMLLM_KERNELS turns the kernels off"
)


def on_path(isa: str, module: str, call: str) -> None:
    """Import tests/kernels/`module` in a child whose kernels are capped at tier `isa` (one of
    kernels.TIERS; the child runs on that tier, or a lower one where the CPU lacks it) and run
    `call` there."""
    cap = kernels.TIERS.index(isa)
    code = (
        "import sys; sys.path.insert(0, 'tests'); sys.path.insert(0, 'tests/kernels');"
        "from slimllm import kernels; isa = kernels.isa();"
        f"assert kernels.TIERS.index(isa) <= {cap} and (isa == 'portable' or {cap != 0}), isa;"
        f"import {module} as t; t.{call}; print('ok')"
    )
    env = dict(os.environ, SLIMLLM_KERNELS_ISA=isa)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 0 and done.stdout.decode().strip() == "ok", done.stderr.decode()
