"""Hypothesis settings profiles of slimllm's tests, registered on import: `ci` and `dev`.

`ci` keeps the suite fast on two cores, `dev` (the default outside CI) draws four times as many
examples. Tests whose every example compiles XLA programs take a fraction of the active
profile's examples through `compiling(divisor)`, so the profile still scales them, but never
fewer than `MIN_EXAMPLES`: one example checks one config, shape and cache dtype, three already
vary them (strategies draw shapes from small sets, so later examples can reuse programs).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = {"ci": 15, "dev": 60}
MIN_EXAMPLES = 3  # the fewest examples `compiling` draws (unless a profile draws fewer)

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
    """The active profile with max_examples / divisor (at least MIN_EXAMPLES), for tests whose
    examples each compile new XLA programs (seconds apiece). Call it after the profile is
    loaded."""
    current = settings()
    floor = min(MIN_EXAMPLES, current.max_examples)
    return settings(current, max_examples=max(floor, current.max_examples // divisor))
