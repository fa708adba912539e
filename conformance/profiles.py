"""Hypothesis settings profiles of slimllm's tests, registered on import: `ci`, `dev`, `fuzz`.

`ci` keeps the suite fast on two cores, `dev` (the default outside CI) draws four times as many
examples. `fuzz` is `ci` for every test except the fuzz suite (tests/fuzz), whose tests take
`fuzzing()` examples: a few dozen per target under `ci`, thousands under `fuzz` (a long local
run: `HYPOTHESIS_PROFILE=fuzz python -m pytest tests/fuzz`).

Tests whose every example compiles XLA programs take a fraction of the active
profile's examples through `compiling(divisor)`, so the profile still scales them, but never
fewer than `MIN_EXAMPLES`: one example checks one config, shape and cache dtype, three already
vary them (strategies draw shapes from small sets, so later examples can reuse programs).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = {"ci": 15, "dev": 60, "fuzz": 15}
FUZZ_EXAMPLES = {"ci": 30, "dev": 100, "fuzz": 3000}  # per fuzz target
MIN_EXAMPLES = 3  # the fewest examples `compiling` draws (unless a profile draws fewer)

for _name, _examples in EXAMPLES.items():
    settings.register_profile(
        _name, max_examples=_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def load_profile(environ=os.environ) -> str:
    """Load `HYPOTHESIS_PROFILE`, else `ci` when `CI` is set, else `dev`; returns its name."""
    global ACTIVE
    name = environ.get("HYPOTHESIS_PROFILE", "ci" if environ.get("CI") else "dev")
    settings.load_profile(name)
    ACTIVE = name
    return name


ACTIVE = "default"  # the profile load_profile loaded


def fuzzing() -> settings:
    """The active profile with the fuzz suite's example count (FUZZ_EXAMPLES; ci's elsewhere)."""
    return settings(settings(), max_examples=FUZZ_EXAMPLES.get(ACTIVE, FUZZ_EXAMPLES["ci"]))


def compiling(divisor: int) -> settings:
    """The active profile with max_examples / divisor (at least MIN_EXAMPLES), for tests whose
    examples each compile new XLA programs (seconds apiece). Call it after the profile is
    loaded."""
    current = settings()
    floor = min(MIN_EXAMPLES, current.max_examples)
    return settings(current, max_examples=max(floor, current.max_examples // divisor))
