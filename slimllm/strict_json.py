"""JSON output that every parser reads: JSON has no NaN or Infinity, and Python's json writes
them bare (`NaN`), which makes a whole output unreadable to a strict parser. Every --json
output (the commands', the benchmarks') goes through `dumps`: non-finite floats become null."""

from __future__ import annotations

import json
import math


def strict(value):
    """`value` with every non-finite float replaced by None (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def dumps(value, **options) -> str:
    """Strict JSON of `value` (json.dumps refuses any NaN left over)."""
    return json.dumps(strict(value), allow_nan=False, **options)
