"""Checkpoint tensors -> reference `Params`, driven by a family's declarative spec.

A `Family` names its tensors with `{i}` for the layer index: `names` maps a canonical parameter
("layers.{i}.wq") to one checkpoint tensor, `fused` maps one checkpoint tensor to a function
that splits it into several canonical parameters, `transforms` post-process a canonical
parameter (after it is in slimllm's `[in, out]` layout), and `ignored` lists checkpoint tensors
that are read and deliberately unused (e.g. cached rotary frequencies). Conversion is strict:
every tensor the config needs must be found, every tensor in the file must be used or ignored,
and every shape must match the config.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from slimllm.reference.config import ModelConfig
from slimllm.reference.params import LayerParams, Params, check_params, layer_shapes, model_shapes

from .io import CheckpointError

# Canonical parameters kept in their checkpoint orientation (tables, not projections).
TABLES = {"embed", "pos_embed"}


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[dict], bool]  # does a hub config.json belong to this family?
    config_from_hf: Callable[[dict], ModelConfig]
    names: dict[str, str]  # canonical -> checkpoint name
    fused: dict[str, Callable] = field(default_factory=dict)  # checkpoint -> fn(w, cfg) -> dict
    transforms: dict[str, Callable] = field(default_factory=dict)  # canonical -> fn(w, cfg)
    ignored: tuple[str, ...] = ()
    tiny: dict = field(default_factory=dict)  # a tiny hub config.json for tests
    rename: Callable[[str], str] | None = None  # normalise checkpoint names (e.g. drop a prefix)


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


def split_rows(sizes_of: Callable[[ModelConfig], dict[str, int]]):
    """A fused-tensor splitter: consecutive blocks of output rows, e.g. [q | k | v]."""

    def split(w, cfg):
        sizes = sizes_of(cfg)
        if w.shape[0] != sum(sizes.values()):
            raise CheckpointError(
                f"fused tensor has {w.shape[0]} rows, expected {sum(sizes.values())} "
                f"({' + '.join(f'{n}={s}' for n, s in sizes.items())})"
            )
        bounds = np.cumsum([0, *sizes.values()])
        return {n: w[a:b] for n, a, b in zip(sizes, bounds[:-1], bounds[1:], strict=True)}

    return split


def qkv_sizes(names: tuple[str, str, str]):
    """Row sizes of a fused [q | k | v] projection for the canonical names given."""

    def sizes(cfg):
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return dict(zip(names, (q, kv, kv), strict=True))

    return sizes


def hf_rope_permute(w, cfg: ModelConfig, n_heads: int):
    """Reorder the output columns of a q/k weight [e, n*d] from interleaved pairs to rotate-half.

    This is the permutation Hugging Face's Llama conversion applies to Meta/llama2.c weights,
    so that rotate-half RoPE on the result equals interleaved RoPE on the original.
    """
    e = w.shape[0]
    d = cfg.head_dim
    w = w.reshape(e, n_heads, d // 2, 2)  # column (head, pair j, member)
    return np.ascontiguousarray(w.transpose(0, 1, 3, 2).reshape(e, n_heads * d))
