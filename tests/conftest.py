"""Shared test setup: where the shared oracle data lives, and Hypothesis profiles.

`../shared` (beside the checkout) holds the trained tiny Llama, the upstream-made fixtures and
real tokenizers; tests that need it skip with a clear reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

# Two XLA CPU devices, so tensor-parallel tests run in one process; set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import numpy as np
import pytest

from slimllm.conformance.profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLIMLLM_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
STORIES = SHARED / "models" / "stories260K"

load_profile()  # `ci` under CI, else `dev` (or HYPOTHESIS_PROFILE): conformance/profiles.py


def need(path: Path) -> Path:
    """Skip the calling test when shared data is absent (it lives outside the repository)."""
    if not path.exists():
        pytest.skip(f"{path} not found: the shared oracle data sits beside the checkout")
    return path


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the fixtures' relative logits measure."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="session")
def stories():
    from slimllm import load

    model = load(need(STORIES / "stories260K.bin"))
    return model, np.load(STORIES / "oracle.npz")
