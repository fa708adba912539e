"""Shared test setup: where the oracle data lives, and Hypothesis profiles.

The trained tiny Llama and the upstream-made fixtures are vendored in tests/data (checked against
their SHA256SUMS by test_data.py), so a fresh clone runs them. The real tokenizers are third-party
files kept outside the repository, in `../shared/tokenizers` beside the checkout (set
`SLIMLLM_SHARED` to move it); tests that need them skip with a clear reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

# Two XLA CPU devices, so tensor-parallel tests run in one process; set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
# No compiled program is kept on disk, here or in the processes tests start: the tests never
# write into the user's cache (~/.cache/slimllm/xla), and every run compiles what it tests.
# test_compile_cache.py turns a cache on where it checks one.
os.environ["SLIMLLM_COMPILE_CACHE"] = "off"

import numpy as np
import pytest

from slimllm.conformance.profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # vendored, see tests/data/README.md
FIXTURES = DATA / "fixtures"  # one tiny checkpoint + upstream oracle per family variant
STORIES = DATA / "models" / "stories260K"  # the trained tiny Llama (llama2.c .bin)
VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "oracle.npz").exists())
SHARED = Path(os.environ.get("SLIMLLM_SHARED", ROOT.parent / "shared"))
TOKENIZERS = SHARED / "tokenizers"  # not vendored: third-party files

load_profile()  # `ci` under CI, else `dev` (or HYPOTHESIS_PROFILE): conformance/profiles.py


def need(path: Path) -> Path:
    """Skip the calling test when data kept outside the repository (real tokenizers) is absent."""
    if not path.exists():
        pytest.skip(
            f"{path} not found: the real tokenizers are third-party files kept outside the "
            "repository, in ../shared/tokenizers beside the checkout (or $SLIMLLM_SHARED)"
        )
    return path


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the fixtures' relative logits measure."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="session")
def stories():
    from slimllm import load

    model = load(STORIES / "stories260K.bin")
    return model, np.load(STORIES / "oracle.npz")
