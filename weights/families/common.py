"""Helpers the family files share for reading hub config.json values strictly."""

from __future__ import annotations

from slimllm.reference.config import WavelengthScaling

from ..io import CheckpointError


def require(hf: dict, *keys):
    """The first of `keys` present in the hub config, else a clear error."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise CheckpointError(f"config.json lacks {' or '.join(keys)}")


def expect(hf: dict, key: str, allowed, default=None):
    """A config value that slimllm supports only in the listed forms."""
    value = hf.get(key, default)
    if value not in allowed:
        raise CheckpointError(
            f"config.json {key}={value!r} is not supported (supported: {allowed})"
        )
    return value


def rope_settings(hf: dict) -> tuple[float, WavelengthScaling | None]:
    """(rope_theta, rope_scaling) from either the classic keys or the newer `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    source = params if params.get("rope_type") else scaling
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), WavelengthScaling(
            float(source["factor"]),
            float(source["low_freq_factor"]),
            float(source["high_freq_factor"]),
            int(source["original_max_position_embeddings"]),
        )
    raise CheckpointError(f"config.json rope scaling type {kind!r} is not supported")


def eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)
