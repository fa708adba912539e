"""Checkpoint tensors -> reference `Params` in a weight format, one tensor at a time.

The spec (`weights.families.common.Family`) maps canonical parameters to checkpoint tensor
names, fused tensors to splitters and canonical parameters to transforms (`weights.transforms`).
Conversion is strict, and every check runs before any tensor data is read: every tensor the
config needs must be found, every tensor in the files must be used or ignored (names come from
the listing, `weights.io.read_tensors`), and every shape must match the config (each splitter
runs first on a stand-in of its tensor: the right shape, every stride 0, no data).

Then the checkpoint tensors are converted one at a time, file by file: each is read, split,
transformed and encoded in the target format, and dropped before the next, so the model is
never held in float32 unless that is its format. A tensor that needs no splitting or transform
goes to `weights.stream.encode_rows` unread, which reads and encodes it a block of rows at a
time (a fixed amount of memory beyond the result); a fused tensor is held whole in its stored
dtype while it is split, and a transformed one is widened whole to float32 for its maths
(NormHead sums its squares in float64: twice that).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import numpy as np

from slimllm.reference.config import ModelConfig
from slimllm.reference.params import LayerParams, Params, check_params, layer_shapes, model_shapes
from slimllm.reference.weight_format import WeightFormat, widen

from .families.common import Family
from .io import CheckpointError, Lazy, shown
from .stream import check_finite, encode_rows, field, scan, torch_to_ours, whole


def expand(pattern: str, n_layers: int) -> list[tuple[int | None, str]]:
    if "{i}" not in pattern:
        return [(None, pattern)]
    return [(i, pattern.format(i=i)) for i in range(n_layers)]


def stand_in(t: Lazy) -> np.ndarray:
    """An array with t's shape and dtype and no data (every stride 0)."""
    return np.broadcast_to(np.zeros((), t.dtype), t.shape)


# The stored dtypes a weight may have: integer or boolean data is not a weight in any family.
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def stand_in_of(t: Lazy, target: str) -> np.ndarray:
    """The stand-in of a tensor the model uses, once its dtype is known to be floating point."""
    if t.dtype.name not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{t.file}: tensor {t.name} is stored as {t.dtype.name}, but {target} needs "
            f"floating-point values ({', '.join(FLOAT_DTYPES)})"
        )
    return stand_in(t)


def split_stand_in(pieces: Callable, t: Lazy, name: str) -> dict[str, np.ndarray]:
    """The pieces a fused tensor's splitter gives for its stand-in; a tensor the splitter cannot
    take (wrong rank or size) is an error naming it, whatever the splitter raised."""
    try:
        return pieces(stand_in_of(t, name))
    except CheckpointError as e:
        raise CheckpointError(f"{t.file}: tensor {name} of shape {t.shape}: {e}") from None
    except (ValueError, IndexError, TypeError) as e:
        raise CheckpointError(
            f"{t.file}: tensor {name} of shape {t.shape} cannot be split as this config needs ({e})"
        ) from None


def expected_shape(cfg: ModelConfig, target: str) -> tuple[int, ...] | None:
    """The reference-layout shape the config wants for a canonical name (None: unused)."""
    layer = re.match(r"layers\.\d+\.(.+)", target)
    return layer_shapes(cfg).get(layer[1]) if layer else model_shapes(cfg).get(target)


def check_shape(cfg: ModelConfig, target: str, piece: np.ndarray, t: Lazy, fused: bool) -> None:
    """A weight of the shape its config wants, else an error naming the checkpoint tensor."""
    want = expected_shape(cfg, target)
    if want is None or tuple(piece.shape) == want:
        return
    if fused:
        got = f"gives {target} of shape {tuple(piece.shape)}"
        want_torch = want
    else:
        got = f"has shape {t.shape}"
        want_torch = tuple(torch_to_ours(target, np.empty(want, np.bool_)).shape)
    raise CheckpointError(
        f"{t.file}: tensor {t.name} {got}, expected {want_torch} for {target} by the config"
    )


def split_targets(split: Callable, cfg: ModelConfig, i: int | None) -> Callable:
    """A fused tensor's splitter, with the layer index put into the canonical names it gives."""

    def pieces(w):
        return {part if i is None else part.format(i=i): p for part, p in split(w, cfg).items()}

    return pieces


def plan(family: Family, cfg: ModelConfig, tensors: dict[str, Lazy]) -> dict[str, Callable]:
    """What each checkpoint tensor used gives: name -> function from the tensor (torch layout)
    to {canonical name: piece}. Names and shapes are checked here, on stand-ins."""
    needed = {f"layers.{{i}}.{n}" for n in layer_shapes(cfg)} | set(model_shapes(cfg))
    files = sorted({t.file for t in tensors.values()})
    where = files[0].parent if files else "checkpoint"  # what messages name
    plans: dict[str, Callable] = {}
    found: dict[str, np.ndarray] = {}  # canonical name -> stand-in in the reference layout

    for source, split in family.fused.items():
        for i, name in expand(source, cfg.n_layers):
            if name in tensors:
                plans[name] = split_targets(split, cfg, i)
                for target, piece in split_stand_in(plans[name], tensors[name], name).items():
                    found[target] = torch_to_ours(target, piece)
                    check_shape(cfg, target, found[target], tensors[name], fused=True)

    direct: dict[str, list[str]] = {}  # checkpoint name -> the canonical names it is
    for canonical, source in family.names.items():
        if canonical not in needed:
            continue
        for i, name in expand(source, cfg.n_layers):
            target = canonical if i is None else canonical.format(i=i)
            if target in found:
                continue
            if name not in tensors:
                raise CheckpointError(f"{where}: missing tensor {name} (needed for {target})")
            direct.setdefault(name, []).append(target)
            found[target] = torch_to_ours(target, stand_in_of(tensors[name], target))
            check_shape(cfg, target, found[target], tensors[name], fused=False)
    plans |= {name: partial(dict.fromkeys, targets) for name, targets in direct.items()}

    ignored = {n for pattern in family.ignored for _, n in expand(pattern, cfg.n_layers)}
    unknown = sorted(set(tensors) - set(plans) - ignored)
    if unknown:
        raise CheckpointError(
            f"{where}: unexpected tensor(s) for a {family.name} model with this config: "
            f"{shown(unknown[:5], 400)}"
        )
    missing = sorted(
        target
        for pattern in needed
        for i, target in expand(pattern, cfg.n_layers)
        if target not in found
    )
    if missing:
        raise CheckpointError(f"{where}: missing weights for {family.name}: {missing[:5]}")
    assemble(family, cfg, found)
    return plans


def assemble(family: Family, cfg: ModelConfig, values: dict) -> Params:
    """Params from canonical name -> weight, every shape checked against the config."""
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


def convert_tensor(family, cfg, source: Lazy, pieces, fused: bool, fmt, group) -> dict:
    """The canonical weights one checkpoint tensor gives, each transformed and encoded: a fused
    tensor is read whole to be split, any other is passed on unread (`encode_rows` reads it)."""
    out = {}
    for target, piece in pieces(source.read() if fused else source).items():
        where = f"{source.file}: tensor {source.name}" + (f" ({target})" if fused else "")
        transform = family.transforms.get(re.sub(r"^layers\.\d+\.", "layers.{i}.", target))
        if transform:  # the maths runs in float32, in the reference layout
            wide = widen(whole(piece))
            check_finite(scan(wide)[0], wide.size, where)  # before the maths spreads it
            piece = torch_to_ours(target, transform(torch_to_ours(target, wide), cfg))
        out[target] = encode_rows(field(target), piece, fmt, group, where)
    return out


def convert(
    family: Family,
    cfg: ModelConfig,
    tensors: dict[str, Lazy],
    fmt: WeightFormat,
    group: int | None = None,
    progress=None,
) -> Params:
    """Params in format `fmt` from a checkpoint's unread tensors (torch layout) following the
    family spec; all checks run before any data is read, then one tensor is read at a time, in
    file order (`progress` wraps the list of files)."""
    if family.rename:
        tensors = {family.rename(name): t for name, t in tensors.items()}
    plans = plan(family, cfg, tensors)
    fused = {name for pattern in family.fused for _, name in expand(pattern, cfg.n_layers)}
    values = {}
    files = list(dict.fromkeys(tensors[name].file for name in plans))
    for file in progress(files) if progress else files:
        for name, pieces in plans.items():
            if tensors[name].file == file:
                t = tensors[name]
                values |= convert_tensor(family, cfg, t, pieces, name in fused, fmt, group)
    return assemble(family, cfg, values)
