"""Checkpoint tensors -> reference `Params`, driven by a family's declarative spec.

The spec (`weights.families.common.Family`) maps canonical parameters to checkpoint tensor
names, fused tensors to splitters and canonical parameters to transforms (`weights.transforms`).
Conversion is strict: every tensor the config needs must be found, every tensor in the file must
be used or ignored, and every shape must match the config.
"""

from __future__ import annotations

import re

import numpy as np

from slimllm.reference.config import ModelConfig
from slimllm.reference.params import LayerParams, Params, check_params, layer_shapes, model_shapes

from .families.common import Family
from .io import CheckpointError

# Canonical parameters kept in their checkpoint orientation (tables, not projections).
TABLES = {"embed", "pos_embed"}


def expand(pattern: str, n_layers: int) -> list[tuple[int | None, str]]:
    if "{i}" not in pattern:
        return [(None, pattern)]
    return [(i, pattern.format(i=i)) for i in range(n_layers)]


def torch_to_ours(canonical: str, w: np.ndarray) -> np.ndarray:
    """torch Linear weights are [out, in]; ours are [in, out]. Tables and vectors are unchanged."""
    base = canonical.rsplit(".", 1)[-1]
    return np.ascontiguousarray(w.T) if w.ndim == 2 and base not in TABLES else w


def convert(family: Family, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
    """Build Params from checkpoint tensors (torch layout) following the family spec."""
    if family.rename:
        tensors = {family.rename(name): w for name, w in tensors.items()}
    needed = {f"layers.{{i}}.{n}" for n in layer_shapes(cfg)} | set(model_shapes(cfg))
    found: dict[str, np.ndarray] = {}
    used: set[str] = set()

    for source, split in family.fused.items():
        for i, name in expand(source, cfg.n_layers):
            if name not in tensors:
                continue
            used.add(name)
            for part, w in split(tensors[name], cfg).items():
                found[part if i is None else part.format(i=i)] = w

    for canonical, source in family.names.items():
        if canonical not in needed:
            continue
        for i, name in expand(source, cfg.n_layers):
            target = canonical if i is None else canonical.format(i=i)
            if target in found:
                continue
            if name not in tensors:
                raise CheckpointError(f"missing tensor {name} (needed for {target})")
            used.add(name)
            found[target] = tensors[name]

    ignored = {n for pattern in family.ignored for _, n in expand(pattern, cfg.n_layers)}
    unknown = sorted(set(tensors) - used - ignored)
    if unknown:
        raise CheckpointError(
            f"unexpected tensor(s) for a {family.name} model with this config: {unknown[:5]}"
        )
    missing = sorted(
        target
        for pattern in needed
        for i, target in expand(pattern, cfg.n_layers)
        if target not in found
    )
    if missing:
        raise CheckpointError(f"missing weights for {family.name}: {missing[:5]}")

    values = {}
    for target, w in found.items():
        w = torch_to_ours(target, np.asarray(w, np.float32))
        transform = family.transforms.get(re.sub(r"^layers\.\d+\.", "layers.{i}.", target))
        values[target] = transform(w, cfg) if transform else w
    layers = [
        LayerParams(**{n: values[f"layers.{i}.{n}"] for n in layer_shapes(cfg)})
        for i in range(cfg.n_layers)
    ]
    params = Params(layers=layers, **{n: values[n] for n in model_shapes(cfg)})
    try:
        check_params(params, cfg)
    except ValueError as e:
        raise CheckpointError(f"{family.name} checkpoint does not match its config: {e}") from None
    return params
