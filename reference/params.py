"""Model weights as plain dataclasses of arrays, with canonical names for every family.

Matrices are stored as `[in, out]` so that every projection reads `y = x @ w`, the way the
maths is written (loaders transpose torch's `[out, in]` Linear layout once). Absent weights are
`None`. The JAX backend registers these same classes as pytrees; nothing here imports jax.
`init_params` builds deterministic random weights for demos, benchmarks and tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass
class LayerParams:
    attn_norm: np.ndarray  # [e]
    wq: np.ndarray  # [e, h*d]
    wk: np.ndarray  # [e, k*d]
    wv: np.ndarray  # [e, k*d]
    wo: np.ndarray  # [h*d, e]
    mlp_norm: np.ndarray  # [e]
    w_up: np.ndarray  # [e, f]
    w_down: np.ndarray  # [f, e]
    w_gate: np.ndarray | None = None  # [e, f] (swiglu)
    attn_norm_b: np.ndarray | None = None  # [e] (layer norm)
    mlp_norm_b: np.ndarray | None = None
    bq: np.ndarray | None = None  # [h*d]
    bk: np.ndarray | None = None  # [k*d]
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None  # [e]
    q_norm: np.ndarray | None = None  # [d]
    k_norm: np.ndarray | None = None
    b_up: np.ndarray | None = None  # [f]
    b_down: np.ndarray | None = None  # [e]


@dataclass
class Params:
    embed: np.ndarray  # [v, e'] (e' = embed_width or e)
    layers: list[LayerParams]
    final_norm: np.ndarray | None = None  # [e]
    final_norm_b: np.ndarray | None = None
    lm_head: np.ndarray | None = None  # [e', v]; None when tied to embed
    pos_embed: np.ndarray | None = None  # [max_len + offset, e] (learned positions)
    proj_in: np.ndarray | None = None  # [e', e]
    proj_out: np.ndarray | None = None  # [e, e']


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every LayerParams field this config uses (absent ones are omitted)."""
    e, h, k, d, f = cfg.width, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_width
    shapes = {
        "attn_norm": (e,),
        "wq": (e, h * d),
        "wk": (e, k * d),
        "wv": (e, k * d),
        "wo": (h * d, e),
        "mlp_norm": (e,),
        "w_up": (e, f),
        "w_down": (f, e),
    }
    if cfg.mlp == "swiglu":
        shapes["w_gate"] = (e, f)
    if cfg.norm == "layer":
        shapes |= {"attn_norm_b": (e,), "mlp_norm_b": (e,)}
    if cfg.qkv_bias:
        shapes |= {"bq": (h * d,), "bk": (k * d,), "bv": (k * d,)}
    if cfg.o_bias:
        shapes["bo"] = (e,)
    if cfg.qk_norm:
        shapes |= {"q_norm": (d,), "k_norm": (d,)}
    if cfg.mlp_bias:
        shapes |= {"b_up": (f,), "b_down": (e,)}
    return shapes


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every top-level Params field this config uses."""
    ew = cfg.embed_width or cfg.width
    shapes = {"embed": (cfg.vocab, ew)}
    if cfg.final_norm:
        shapes["final_norm"] = (cfg.width,)
        if cfg.norm == "layer":
            shapes["final_norm_b"] = (cfg.width,)
    if not cfg.tied_head:
        shapes["lm_head"] = (ew, cfg.vocab)
    if cfg.pos == "learned":
        shapes["pos_embed"] = (cfg.max_len + cfg.pos_offset, cfg.width)
    if ew != cfg.width:
        shapes |= {"proj_in": (ew, cfg.width), "proj_out": (cfg.width, ew)}
    return shapes


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise a clear error when a weight is missing, unexpected or of the wrong shape."""

    def check(obj, shapes, where):
        for field in dataclasses.fields(obj):
            if field.name == "layers":
                continue
            value = getattr(obj, field.name)
            want = shapes.get(field.name)
            if want is None and value is not None:
                raise ValueError(f"{where}{field.name}: present but this config does not use it")
            if want is not None and value is None:
                raise ValueError(f"{where}{field.name}: missing (expected shape {want})")
            if want is not None and tuple(value.shape) != want:
                raise ValueError(
                    f"{where}{field.name}: shape {tuple(value.shape)}, expected {want}"
                )

    check(params, model_shapes(cfg), "")
    if len(params.layers) != cfg.n_layers:
        raise ValueError(f"{len(params.layers)} layers, config says {cfg.n_layers}")
    shapes = layer_shapes(cfg)
    for i, layer in enumerate(params.layers):
        check(layer, shapes, f"layers.{i}.")


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> Params:
    """Deterministic random weights: N(0, 1/fan_in) matrices, norms near 1, small biases."""
    rng = np.random.default_rng(seed)

    def draw(name, shape):
        if name.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        if len(shape) == 1:
            return (0.1 * rng.standard_normal(shape)).astype(dtype)
        if name in ("embed", "pos_embed"):
            return (rng.standard_normal(shape)).astype(dtype)
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)

    layers = [
        LayerParams(**{name: draw(name, shape) for name, shape in layer_shapes(cfg).items()})
        for _ in range(cfg.n_layers)
    ]
    top = {name: draw(name, shape) for name, shape in model_shapes(cfg).items()}
    return Params(layers=layers, **top)


def cast_params(params: Params, dtype) -> Params:
    """A copy of params with every array cast to dtype."""

    def cast(obj):
        arrays = {field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)}
        return dataclasses.replace(
            obj,
            **{
                name: None if x is None else x.astype(dtype)
                for name, x in arrays.items()
                if name != "layers"
            },
        )

    return dataclasses.replace(cast(params), layers=[cast(layer) for layer in params.layers])
