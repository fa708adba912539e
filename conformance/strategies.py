"""Hypothesis strategies: model configs, weights, prompts, runtime settings and attention inputs.

Configs cover every feature the families combine (both norms, the three MLPs, the four position
encodings with every RoPE variant, biases, q/k norm, the three residual layouts, tied and narrow
embeddings, MHA/GQA/MQA, prefix-LM block tokens), but every SHAPE comes from a small discrete
set: the JAX backend compiles one program per (config, shape), so a test's compile count stays
bounded, while values (weights by seed, token ids, prompt and past lengths, prefixes) are drawn
freely because they are traced, not compiled. Runtime settings (attention kind with its block
and tile sizes, KV cache dtype) are drawn apart from the config, as the code keeps them apart
(STYLE.md rule 2). Every block and tile size here divides every padded JAX cache length
(multiples of 64 up to 256, of 256 above: `jaxbackend.kv_cache.padded_len`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as np_arrays

from slimllm.jaxbackend import kv_cache as jax_kv
from slimllm.jaxbackend.runtime import ATTENTION as JAX_ATTENTION
from slimllm.reference import kv_cache as ref_kv
from slimllm.reference import positions
from slimllm.reference.attention import attention_bias
from slimllm.reference.config import (
    MLPS,
    NORMS,
    POSITIONS,
    RESIDUALS,
    ROPE_STYLES,
    DynamicNTK,
    ModelConfig,
    WavelengthScaling,
)
from slimllm.reference.params import Params, init_params
from slimllm.reference.runtime import ATTENTION as REF_ATTENTION
from slimllm.reference.runtime import Runtime
from slimllm.reference.weight_format import encode_params, weight_format

# ---------------------------------------------------------------- shapes (small discrete sets)

VOCAB = 32
MAX_LEN = 64
WIDTHS = (16, 32)
HEADS = ((2, 2), (4, 2), (4, 1), (6, 2))  # (h, k): MHA, GQA, MQA, non-power-of-two ALiBi heads
HEAD_DIMS = (4, 8)
LAYERS = (1, 2)
FFN_WIDTH = 24
EMBED_WIDTHS = (0, 8)  # 0: embeddings in the model width; 8: projected in and out
THETAS = (10000.0, 500000.0)
WAVELENGTH = WavelengthScaling(8.0, 1.0, 4.0, 16)  # bands at wavelengths 4..16: all three used
NTK = DynamicNTK(8)  # prompts longer than 8 stretch the RoPE base
LOGN_LEN = 8
# Prefix-LM special ids at the top of the vocabulary; prompts draw plain ids below them.
BLOCK_START = VOCAB - 1
ANCHORS = (VOCAB - 2, VOCAB - 3)
PLAIN = VOCAB - 3
PAD_TO = 16  # model tests pad every prompt chunk to this, so one program serves all lengths
KV_DTYPES = ref_kv.KV_DTYPES
ATTENTION_KINDS = tuple(REF_ATTENTION)
ATTENTION_OPTIONS = {
    "naive": {"key_block": (16, 256)},
    "slim": {"mb": (None, 2, 3), "key_splits": (1, 2, 3), "key_block": (16, 64, 256)},
    "flash": {"q_tile": (2, 4, 64), "k_tile": (8, 16, 64)},
}
# Options only the JAX kernels take: JAX computes naive attention in key blocks (for speed), the
# reference's naive attention is the literal definition.
JAX_ONLY_OPTIONS = {"naive": ("key_block",)}


@st.composite
def configs(draw, dynamic_ntk: bool = True) -> ModelConfig:
    """A tiny ModelConfig with any combination of features (dynamic NTK optional: prefill and
    single steps differ under it by design)."""
    h, k = draw(st.sampled_from(HEADS))
    d = draw(st.sampled_from(HEAD_DIMS))
    n_layers = draw(st.sampled_from(LAYERS))
    pos = draw(st.sampled_from(POSITIONS))
    rope = pos in ("rope", "rope2d")
    prefix_lm = pos == "rope2d" or draw(st.booleans())
    fraction = draw(st.sampled_from((1.0, 0.5))) if pos == "rope" else 1.0
    rotary = d // 2 if pos == "rope2d" else int(d * fraction)
    # dynamic NTK stretches the base by alpha^(r/(r-2)): undefined for a rotary dim of 2
    scalings = [None, WAVELENGTH] + ([NTK] if dynamic_ntk and rotary > 2 else [])
    residual = draw(st.sampled_from(RESIDUALS))
    return ModelConfig(
        vocab=VOCAB,
        width=draw(st.sampled_from(WIDTHS)),
        n_layers=n_layers,
        n_heads=h,
        n_kv_heads=k,
        head_dim=d,
        ffn_width=FFN_WIDTH,
        max_len=MAX_LEN,
        norm=draw(st.sampled_from(NORMS)),
        norm_eps=draw(st.sampled_from((1e-5, 1e-6))),
        mlp=draw(st.sampled_from(MLPS)),
        pos=pos,
        rope_style=draw(st.sampled_from(ROPE_STYLES)) if rope else "half",
        rope_theta=draw(st.sampled_from(THETAS)) if rope else 10000.0,
        rope_fraction=fraction,
        rope_scaling=draw(st.sampled_from(scalings)) if rope else None,
        rope_f16_freqs=draw(st.booleans()) if rope else False,
        pos_offset=draw(st.sampled_from((0, 2))) if pos == "learned" else 0,
        # logN scaling reads one position id per token: not defined for rope2d's two ids
        logn_len=draw(st.sampled_from((0, LOGN_LEN))) if pos == "rope" else 0,
        qkv_bias=draw(st.booleans()),
        o_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        residual=residual,
        residual_alpha=(
            draw(st.sampled_from((1.0, math.sqrt(2 * n_layers))))
            if residual == "normed_input"
            else 1.0
        ),
        final_norm=draw(st.booleans()),
        tied_head=draw(st.booleans()),
        embed_width=draw(st.sampled_from(EMBED_WIDTHS)),
        block_start_id=BLOCK_START if prefix_lm else -1,
        block_anchor_ids=ANCHORS if prefix_lm else (),
    )


# Weight formats as (name, group): every format; int8 per-channel (its default) and in groups of
# 4, int4 in groups of 4 (4 divides every input width the configs draw: widths, heads x head
# dims, FFN, embed width; int4's default of 32 would not).
WEIGHTS = (
    ("float32", None),
    ("bfloat16", None),
    ("float16", None),
    ("int8", None),
    ("int8", 4),
    ("int4", 4),
)


def weights(formats=WEIGHTS) -> st.SearchStrategy[tuple[str, int | None]]:
    return st.sampled_from(formats)


def params(cfg: ModelConfig, formats=WEIGHTS) -> st.SearchStrategy[Params]:
    """Weights for cfg from `reference.params.init_params` with a drawn seed, stored in a drawn
    weight format."""

    def build(seed, fmt):
        p = init_params(cfg, seed)
        return p if fmt[0] == "float32" else encode_params(p, weight_format(fmt[0]), fmt[1])

    return st.builds(build, st.integers(0, 2**32 - 1), weights(formats))


# ---------------------------------------------------------------- prompts


@st.composite
def prompt(draw, cfg: ModelConfig, min_len: int = 1, max_len: int = 10) -> list[int]:
    """One prompt the config accepts. Prefix-LM prompts are `body + [anchor] + [block start] +
    tail`: the block start ends the bidirectional prefix and the anchor (a mask token, required
    by rope2d) fixes the first position id of every block token (`positions.start_state`)."""
    plain = st.integers(0, PLAIN - 1)
    if not cfg.prefix_lm:
        return draw(st.lists(plain, min_size=min_len, max_size=max_len))
    anchor = (
        draw(st.sampled_from(ANCHORS))
        if cfg.pos == "rope2d"
        else draw(st.sampled_from((None, *ANCHORS)))
    )
    special = [anchor, BLOCK_START] if anchor is not None else [BLOCK_START]
    room = max_len - len(special)
    body = draw(st.lists(plain, max_size=room))
    tail = draw(st.lists(plain, max_size=min(2, room - len(body))))
    return body + special + tail


def prompts(cfg: ModelConfig, batch=(1, 3), max_len: int = 10) -> st.SearchStrategy:
    """A ragged batch of prompts (batch size from `batch`)."""
    return st.sampled_from(batch).flatmap(
        lambda b: st.lists(prompt(cfg, max_len=max_len), min_size=b, max_size=b)
    )


def continuations(n_rows: int, length: int) -> st.SearchStrategy:
    """Teacher-forced tokens after each prompt: [n_rows][length] plain ids."""
    row = st.lists(st.integers(0, PLAIN - 1), min_size=length, max_size=length)
    return st.lists(row, min_size=n_rows, max_size=n_rows)


@st.composite
def states(draw, cfg: ModelConfig, t: int = 1, batch=(1, 2)) -> positions.SeqState:
    """A SeqState read off drawn prompts, moved to drawn past lengths, for t more tokens. A
    prefix-LM prefix lies in the past or in those t tokens (it is written before it is read)."""
    state = positions.start_state(cfg, draw(prompts(cfg, batch)))
    lengths = [draw(st.integers(max(0, int(p) - t), 24)) for p in state.prefix]
    return positions.SeqState(np.array(lengths), state.prefix, state.anchor, state.ntk_alpha)


# ---------------------------------------------------------------- runtime settings


@dataclass(frozen=True)
class Kernel:
    """An attention function with fixed block/tile options. Hashable by value, so it is a valid
    static jit argument and equal kernels share compiled programs."""

    fn: Callable
    options: tuple = ()  # (name, value) pairs

    def __call__(self, q, kv, bias, scale):
        return self.fn(q, kv, bias, scale, **dict(self.options))


def backend_options(backend: str, kind: str, options: tuple) -> tuple:
    """The (name, value) options of attention `kind` that `backend`'s kernel takes."""
    if backend == "jax":
        return options
    return tuple(
        (name, value) for name, value in options if name not in JAX_ONLY_OPTIONS.get(kind, ())
    )


def kernel(rt: Runtime, backend: str) -> Kernel:
    """The attention function of `rt` in `backend` ("numpy" or "jax"), to call directly."""
    table = REF_ATTENTION if backend == "numpy" else JAX_ATTENTION
    return Kernel(table[rt.attention], backend_options(backend, rt.attention, rt.attention_options))


@st.composite
def attention_options(draw, kind: str) -> tuple:
    """Block/tile options of one attention kind, each dividing every padded JAX cache."""
    return tuple(
        (name, draw(st.sampled_from(values))) for name, values in ATTENTION_OPTIONS[kind].items()
    )


@st.composite
def runtimes(draw, attention: str | None = None, kv_dtype: str | None = None) -> Runtime:
    kind = attention or draw(st.sampled_from(ATTENTION_KINDS))
    dtype = kv_dtype or draw(st.sampled_from(KV_DTYPES))
    return Runtime(attention=kind, kv_dtype=dtype, attention_options=draw(attention_options(kind)))


# ---------------------------------------------------------------- values


def floats(lo: float = -4.0, hi: float = 4.0) -> st.SearchStrategy[float]:
    """float32 values in [lo, hi] that are 0 or at least 2^-10 in magnitude: XLA:CPU flushes
    subnormal results to zero, NumPy does not, and that is not what these tests are about."""
    lo, hi, tiny = float(np.float32(lo)), float(np.float32(hi)), 2.0**-10
    pos = st.floats(max(lo, tiny), hi, width=32)
    if lo > 0:
        return pos
    return (
        st.one_of(st.just(0.0), pos, st.floats(lo, -tiny, width=32))
        if lo < 0
        else st.one_of(st.just(0.0), pos)
    )


def arrays(shape, lo: float = -4.0, hi: float = 4.0) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays of `shape` with values from `floats` (ties and zeros included)."""
    return np_arrays(np.float32, shape, elements=floats(lo, hi))


def normal(shape, scale: float = 1.0) -> st.SearchStrategy[np.ndarray]:
    """Standard normal float32 values from a drawn seed: for arrays too big to draw one value
    at a time (hidden states, K/V), and well conditioned (no constant rows)."""
    return st.integers(0, 2**32 - 1).map(
        lambda seed: (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    )


def shapes(last: tuple[int, ...]) -> st.SearchStrategy[tuple[int, ...]]:
    """[b, t, *last] with b in {1, 2} and t in {1, 3}."""
    return st.tuples(st.sampled_from((1, 2)), st.sampled_from((1, 3))).map(lambda bt: bt + last)


# ---------------------------------------------------------------- attention inputs


@dataclass
class AttentionCase:
    """K/V of `past + t` tokens written to a cache, t queries after `past`, a mask kind."""

    cfg: ModelConfig  # heads, head dim and the bias kind (alibi or not) only
    q: np.ndarray  # [b,t,h,d]
    k: np.ndarray  # [b,past+t,k,d]
    v: np.ndarray
    state: positions.SeqState  # lengths = past, prefix per row
    length: int  # reference cache length s (>= past + t)
    kv_dtype: str

    @property
    def scale(self) -> float:
        return self.cfg.head_dim**-0.5

    def reference(self):
        """(q, LayerKV, bias [b,h|1,t,s], scale) for the reference's attention functions."""
        b, n = self.k.shape[:2]
        cache = ref_kv.init_cache(self.cfg, b, self.length, self.kv_dtype)
        cache = ref_kv.write(cache, 0, self.k, self.v, np.broadcast_to(np.arange(n), (b, n)))
        pos = positions.positions_for(self.cfg, self.state, self.q.shape[1])
        return self.q, ref_kv.read(cache, 0), attention_bias(self.cfg, pos, self.length), self.scale

    def jax(self):
        """(q, JAX cache, bias, scale) holding the SAME stored values as `reference()`, the
        cache padded to `padded_len` and the bias padded with -inf (padding is never visible)."""
        q, kv, bias, scale = self.reference()
        scales = ((kv.k_scale,), (kv.v_scale,)) if kv.k_scale is not None else (None, None)
        cache = jax_cache(ref_kv.KVCache((kv.k,), (kv.v,), *scales, kv.fmt.name))
        pad = jax_kv.padded_len(self.length) - self.length
        bias = np.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=-np.inf)
        return jnp.asarray(q), cache, jnp.asarray(bias), scale


def jax_cache(cache: ref_kv.KVCache):
    """A reference cache's stored values as a JAX cache padded to `padded_len`: the same bits
    viewed as the JAX format's storage (bfloat16 bit patterns become jnp.bfloat16 values);
    padding slots are zero, as in a fresh cache."""
    s = cache.max_len
    pad = jax_kv.padded_len(s) - s
    storage = jax_kv.KV_FORMATS[cache.format].storage

    def layers(values, dtype):
        if values is None:
            return None
        widths = ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (values[0].ndim - 3)
        return tuple(jnp.asarray(np.pad(x, widths).view(dtype)) for x in values)

    return ref_kv.KVCache(
        layers(cache.k, storage),
        layers(cache.v, storage),
        layers(cache.k_scale, np.float32),
        layers(cache.v_scale, np.float32),
        cache.format,
    )


@st.composite
def attention_cases(draw, kv_dtype: str | None = None, t: int | None = None) -> AttentionCase:
    """Shapes from small sets (one JAX compile serves many examples); past lengths, prefixes and
    values drawn freely. Every case fits a 64-slot JAX cache."""
    b = draw(st.sampled_from((1, 2)))
    t = t or draw(st.sampled_from((1, 5)))
    kh, g = draw(st.sampled_from(((1, 2), (2, 1), (2, 3))))
    d = draw(st.sampled_from((4, 8)))
    mask = draw(st.sampled_from(("causal", "prefix", "alibi")))
    dtype = kv_dtype or draw(st.sampled_from(KV_DTYPES))
    past = draw(st.integers(0, 48))
    spare = draw(st.sampled_from((0, 3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cfg = ModelConfig(
        vocab=VOCAB,
        width=kh * g * d,
        n_layers=1,
        n_heads=kh * g,
        n_kv_heads=kh,
        head_dim=d,
        ffn_width=8,
        max_len=MAX_LEN,
        pos="alibi" if mask == "alibi" else "rope",
    )
    n = past + t
    prefix = (
        np.array(draw(st.lists(st.integers(0, n), min_size=b, max_size=b)))
        if mask == "prefix"
        else np.zeros(b, np.int64)
    )
    state = positions.SeqState(
        np.full(b, past), prefix, np.zeros(b, np.int64), np.ones(b, np.float32)
    )
    return AttentionCase(
        cfg,
        (rng.standard_normal((b, t, kh * g, d)) * 2).astype(np.float32),
        (rng.standard_normal((b, n, kh, d)) * 2).astype(np.float32),
        rng.standard_normal((b, n, kh, d)).astype(np.float32),
        state,
        n + spare,
        dtype,
    )
