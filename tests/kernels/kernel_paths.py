"""Run a kernel test module's checks again on another instruction-set path, in a process of its
own (the path is chosen once per process: `SLIMLLM_KERNELS_ISA=portable` forces the portable
path, `=avx512` turns AMX off)."""

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
    """Import tests/kernels/`module` in a child on path `isa` ("portable", or "avx512": no AMX)
    and run `call` there."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); sys.path.insert(0, 'tests/kernels');"
        "from slimllm import kernels; isa = kernels.isa();"
        f"assert isa != 'avx512-amx' and (isa == 'portable' or {isa != 'portable'}), isa;"
        f"import {module} as t; t.{call}; print('ok')"
    )
    env = dict(os.environ, SLIMLLM_KERNELS_ISA=isa)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 0 and done.stdout.decode().strip() == "ok", done.stderr.decode()
