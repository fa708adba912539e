"""Hypothesis settings profiles of slimllm's tests, registered on import: `ci` and `dev`.

`ci` keeps the suite fast on two cores, `dev` (the default outside CI) draws four times as many
examples. Tests whose every example compiles XLA programs take a fraction of the active
profile's examples through `compiling(divisor)`, so the profile still scales them.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = {"ci": 15, "dev": 60}

for _name, _examples in EXAMPLES.items():
    settings.register_profile(
        _name, max_examples=_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def load_profile(environ=os.environ) -> str:
    """Load `HYPOTHESIS_PROFILE`, else `ci` when `CI` is set, else `dev`; returns its name."""
    name = environ.get("HYPOTHESIS_PROFILE", "ci" if environ.get("CI") else "dev")
    settings.load_profile(name)
    return name


def compiling(divisor: int) -> settings:
    """The active profile with max_examples / divisor (at least 1), for tests whose examples
    each compile new XLA programs (seconds apiece). Call it after the profile is loaded."""
    current = settings()
    return settings(current, max_examples=max(1, current.max_examples // divisor))
