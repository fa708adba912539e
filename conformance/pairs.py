"""Every reference function paired with its JAX twin: how to draw inputs and how to compare.

`PAIRS` holds one `Pair` per function of reference/ with a twin in jaxbackend/ (STYLE.md rule 8:
same file, same name). A pair draws a `Case` (the reference's arguments, and the same values as
JAX arguments), calls both functions, the JAX one under `jax.jit` with its non-array arguments
static, and compares:
- float32 outputs within `tolerances.FUNCTION` (1e-5 relative), whole-model logits within
  `ACROSS_BACKENDS`; integer ids, int8 codes, RNG bits and stored cache values exactly;
- -inf patterns (masks, filtered logits) exactly, except that a sampling decision may flip
  where it sits within FUNCTION of its threshold (`invariants.margins`): the backends sum
  softmax and cumulative sums in different orders;
- XLA:CPU compiles `x / c` for a scalar c as `x * (1/c)`, one ulp from the reference's division
  in ~5% of elements: temperature, repetition penalty and int8 scales (amax / 127) are
  therefore compared within FUNCTION, not bit for bit;
- JAX caches by their logical contents: the JAX cache is padded to `padded_len` (multiples of
  64/256) and stores bfloat16 as `jnp.bfloat16` where the reference keeps uint16 bit patterns.
Where signatures differ by design (NTK alpha per row [b] in JAX, seeds as [b, 2] uint32 words,
a padded cache and bias, key blocks as a start and a static size n where the reference takes
bounds [lo, hi), linear weights stored [out, in] on the device, JAX-only kernel options such as
naive attention's key block) the Case, a small adapter or `strategies.backend_options` says so.
JAX's `LayerKV` is a view, not a pytree: functions that take one get the JAX cache and read
layer 0 inside jit. A pair's `cost` says how many times dearer than a plain op its examples are
(config-dependent programs compile per example).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from slimllm.jaxbackend import attention as jax_attention
from slimllm.jaxbackend import key_blocks as jax_key_blocks
from slimllm.jaxbackend import kv_cache as jax_kv
from slimllm.jaxbackend import model as jax_model
from slimllm.jaxbackend import ops as jax_ops
from slimllm.jaxbackend import positions as jax_positions
from slimllm.jaxbackend import quant as jax_quant
from slimllm.jaxbackend import runtime as jax_runtime
from slimllm.jaxbackend import sampling as jax_sampling
from slimllm.jaxbackend import slim_attention as jax_slim
from slimllm.jaxbackend import weight_format as jax_wf
from slimllm.jaxbackend.params import device_array, layer_to_device, to_device
from slimllm.reference import attention as ref_attention
from slimllm.reference import key_blocks as ref_key_blocks
from slimllm.reference import kv_cache as ref_kv
from slimllm.reference import model as ref_model
from slimllm.reference import ops as ref_ops
from slimllm.reference import positions as ref_positions
from slimllm.reference import quant as ref_quant
from slimllm.reference import runtime as ref_runtime
from slimllm.reference import sampling as ref_sampling
from slimllm.reference import slim_attention as ref_slim
from slimllm.reference import weight_format as ref_wf
from slimllm.reference.config import ROPE_STYLES, DynamicNTK, ModelConfig
from slimllm.reference.params import LayerParams, Params
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import SamplingConfig

from . import strategies as S
from .invariants import margins
from .tolerances import (
    ACROSS_BACKENDS,
    FUNCTION,
    QUANTUM,
    THROUGH_CACHE,
    assert_close,
    rel_err,
)

F32 = FUNCTION["float32"]


@dataclass(frozen=True)
class Case:
    ref: tuple  # the reference function's arguments
    jax: tuple  # the JAX function's arguments: the same values as JAX types


@dataclass(frozen=True)
class Pair:
    name: str  # module.function in both backends
    reference: Callable
    jax: Callable
    inputs: st.SearchStrategy  # draws a Case
    compare: Callable  # compare(want, got, case) raises AssertionError
    static: tuple[int, ...] | None = ()  # static argument positions under jit; None: no jit
    cost: int = 1  # tests draw max_examples / cost: most examples compile a new program

    def check(self, case: Case) -> None:
        fn = self.jax if self.static is None else jitted(self.jax, self.static)
        got = jax.tree_util.tree_map(np.asarray, fn(*case.jax))
        self.compare(self.reference(*case.ref), got, case)


@functools.cache
def jitted(fn, static: tuple[int, ...]):
    """One jit wrapper per function, so equal static arguments and shapes reuse a program."""
    return jax.jit(fn, static_argnums=static)


# ---------------------------------------------------------------- converting and comparing


def to_jax(x):
    """A reference argument as the JAX backend takes it (configs and scalars unchanged)."""
    if isinstance(x, np.ndarray):
        return jnp.asarray(x)
    if isinstance(x, Params):
        return to_device(x)
    if isinstance(x, ref_kv.KVCache):
        return S.jax_cache(x)
    if isinstance(x, LayerParams):
        return layer_to_device(x)
    if isinstance(x, (ref_positions.Positions, ref_positions.SeqState)):
        return jax.tree_util.tree_map(jnp.asarray, x)
    return x


def same_values(strategy) -> st.SearchStrategy[Case]:
    """Cases whose JAX arguments are `to_jax` of the drawn reference arguments."""
    return strategy.map(lambda args: Case(tuple(args), tuple(to_jax(a) for a in args)))


def close(rtol: float = F32):
    """Every output array (one, or a tuple) within rtol, with the same shapes."""

    def compare(want, got, case):
        wants, gots = jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)
        assert len(wants) == len(gots)
        for w, g in zip(wants, gots, strict=True):
            assert np.shape(w) == np.shape(g), (np.shape(w), np.shape(g))
            if np.size(w):
                assert_close(g, w, rtol)

    return compare


def compare_angles(want, got, case):
    """cos and sin within F32 absolutely, scaled by the largest angle: an angle pos * freq in
    float32 carries a rounding of a few ulps of itself (one ulp of freq between NumPy and XLA
    becomes pos ulps of the angle), so sin near 0 at position 49 can differ by 4e-6 while its
    largest value is 0.06; any real error (a wrong frequency) is of order 1."""
    largest = max(1.0, float(np.abs(case.ref[1]).max()))  # |pos| bounds the angle: freq <= 1
    for w, g in zip(want, got, strict=True):
        assert np.shape(w) == np.shape(g), (np.shape(w), np.shape(g))
        err = float(np.abs(np.asarray(g, np.float64) - w).max()) if np.size(w) else 0.0
        assert err <= F32 * largest, f"|cos/sin error| {err:.3g} > {F32 * largest:.3g}"


def exact(want, got, case):
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_array_equal(g, w)


def masked_close(want, got, case=None) -> None:
    """The same infinities, finite values within FUNCTION."""
    want, got = np.asarray(want), np.asarray(got)
    assert want.shape == got.shape, (want.shape, got.shape)
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    finite = np.isfinite(want)
    assert np.isfinite(got[finite]).all()
    if finite.any():
        assert_close(got[finite], want[finite], F32)


def bits(x):
    """Stored cache values as comparable arrays: bfloat16 as its uint16 bit patterns."""
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype == jnp.bfloat16 else x


def logical(cache, s: int):
    """A JAX cache (host arrays) as the reference stores it: the first s slots, bf16 as bits."""

    def trim(layers):
        return None if layers is None else tuple(bits(x)[:, :, :s] for x in layers)

    return ref_kv.KVCache(
        trim(cache.k), trim(cache.v), trim(cache.k_scale), trim(cache.v_scale), cache.format
    )


def close_caches(want, got) -> None:
    """Dequantised K/V of every layer within one storage step (`QUANTUM`) of the reference, or
    within FUNCTION where that is larger (float32): the keys written are `qkv`'s, which the
    backends compute within FUNCTION (RoPE at position p carries p ulps of its angle, see
    `compare_angles`: float32 keys at positions 20-30 differ by 1-2e-6 relative, measured)."""
    got = logical(got, want.max_len)
    quantum = max(QUANTUM[want.format], F32)
    for layer in range(len(want.k)):
        pairs = zip(
            ref_kv.dequantized(ref_kv.read(got, layer)),
            ref_kv.dequantized(ref_kv.read(want, layer)),
            strict=True,
        )
        for g, w in pairs:
            err = np.abs(g - w).max()
            assert err <= quantum * max(np.abs(w).max(), 1e-30) * 1.01, f"layer {layer}: {err}"


def compare_quantized(want, got, case):
    """int8 codes bit for bit; scales (amax / 127, see the module docstring) within FUNCTION."""
    np.testing.assert_array_equal(got[0], want[0])
    assert_close(got[1], want[1], F32, "scale")


def compare_write(want, got, case):
    """Stored values bit for bit, int8 scales within FUNCTION; padding slots stay zero."""
    s = want.max_len
    for name in ("k", "v", "k_scale", "v_scale"):
        w, g = getattr(want, name), getattr(got, name)
        assert (w is None) == (g is None), name
        for wl, gl in zip(w or (), g or (), strict=True):
            if name.endswith("scale"):
                assert_close(gl[:, :, :s], wl, F32, name)
            else:
                np.testing.assert_array_equal(bits(gl)[:, :, :s], wl, err_msg=name)
            assert not bits(gl)[:, :, s:].any(), f"{name}: a padding slot was written"


def compare_read(want, got, case):
    """Widened keys and values bit for bit (the logical slots), scales within FUNCTION."""
    s = case.ref[0].max_len
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert (w is None) == (g is None)
        if w is not None and i < 2:
            np.testing.assert_array_equal(g[:, :, :s], w)
        elif w is not None:
            assert_close(g[:, :, :s], w, F32, "scale")


def compare_bias(want, got, case):
    """The logical columns as masks and values; every padding column masked."""
    s = want.shape[-1]
    masked_close(want, got[..., :s])
    assert np.all(np.isneginf(got[..., s:])), "a padding slot is visible"


def same_fields(*names: str):
    """Every named field of a Positions or SeqState value equal (int and float32 arrays)."""

    def compare(want, got, case):
        for name in names:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)

    return compare


compare_positions = same_fields("slots", "ids", "prefix", "ntk_alpha")
compare_state = same_fields("lengths", "prefix", "anchor", "ntk_alpha")


def compare_init(want, got, case):
    """An empty cache: the reference's storage dtype (bfloat16 as its uint16 bits) and shapes,
    the slot axis padded to `padded_len`, every value zero, scales for scaled formats only."""
    assert got.format == want.format
    s = jax_kv.padded_len(want.max_len)
    for name in ("k", "v", "k_scale", "v_scale"):
        w, g = getattr(want, name), getattr(got, name)
        assert (w is None) == (g is None), name
        for wl, gl in zip(w or (), g or (), strict=True):
            gl = bits(gl)
            assert gl.dtype == wl.dtype, (name, gl.dtype, wl.dtype)
            assert gl.shape == (*wl.shape[:2], s, *wl.shape[3:]), (name, gl.shape, wl.shape)
            assert not wl.any() and not gl.any(), f"{name}: an empty cache holds a nonzero value"


def compare_encoded(want, got, case):
    """Stored values bit for bit in the reference's storage dtype (bfloat16 as bits); int8
    scales within FUNCTION (amax / 127, as `compare_quantized`)."""
    stored = bits(got[0])
    assert stored.dtype == want[0].dtype, (stored.dtype, want[0].dtype)
    np.testing.assert_array_equal(stored, want[0])
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        assert_close(got[1], want[1], F32, "scale")


def compare_layer(want, got, case):
    """A block or the whole model, through freshly written (possibly lossy) K/V: outputs within
    THROUGH_CACHE (block) or ACROSS_BACKENDS (logits), the new cache within one storage step."""
    cache = next(a for a in case.ref if isinstance(a, ref_kv.KVCache))
    bound = (ACROSS_BACKENDS if isinstance(case.ref[0], Params) else THROUGH_CACHE)[cache.format]
    assert_close(got[0], want[0], bound, "output")
    close_caches(want[1], got[1])


def compare_traces(want, got, case):
    """The same named intermediates (`model.TRACE_KEYS`), each within ACROSS_BACKENDS of the
    cache's dtype, as the logits: what `slimllm diff` relies on when it compares the backends
    name by name."""
    cache = next(a for a in case.ref if isinstance(a, ref_kv.KVCache))
    assert "logits" in want, sorted(want)  # the reference's forward observed its intermediates
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for name, w in want.items():
        assert np.shape(got[name]) == np.shape(w), (name, np.shape(got[name]), np.shape(w))
        assert_close(got[name], w, ACROSS_BACKENDS[cache.format], name)


def same_row(want, got) -> bool:
    """The same id, or the same -inf pattern with finite scores within FUNCTION."""
    if want.dtype.kind != "f":
        return bool(np.array_equal(want, got))
    kept = np.isfinite(want)
    if not np.array_equal(kept, np.isfinite(got)):
        return False
    return not kept.any() or rel_err(got[kept], want[kept]) <= F32


def decisions(sampling_of):
    """Compare filtered scores or chosen ids row by row (`same_row`), unless the reference's
    decision margin in that row (`invariants.margins`) is below FUNCTION."""

    def compare(want, got, case):
        logits, sc, seen, u = sampling_of(*case.ref)
        want, got = np.asarray(want), np.asarray(got)
        assert want.shape == got.shape
        for r in range(want.shape[0]):
            if same_row(want[r], got[r]):
                continue
            margin = margins(
                logits[r : r + 1], sc, seen[r : r + 1], None if u is None else u[r : r + 1]
            )[0]
            assert margin < F32, f"row {r} differs with decision margin {margin:.2e}"

    return compare


def one_filter(name):
    """(logits, value) -> what `margins` needs for a sampling config with only this filter."""

    def of(logits, value):
        return (
            logits,
            SamplingConfig(temperature=1.0, **{name: value}),
            np.zeros(logits.shape, bool),
            None,
        )

    return of


def choose_sampling(scores, u):
    return scores, SamplingConfig(temperature=1.0), np.zeros(scores.shape, bool), u


def sample_sampling(logits, sc, seen, seeds, step):
    return logits, sc, seen, ref_sampling.uniform(seeds, step)


def process_sampling(logits, sc, seen):
    return logits, sc, seen, None


# ---------------------------------------------------------------- adapters


def ref_inv_freq(cfg, alpha):
    """The reference takes one alpha per call; JAX takes the batch's alphas [b]."""
    return np.stack([ref_positions.inv_freq(cfg, float(a)) for a in alpha])


def jax_bias(cfg, pos, s: int):
    """The JAX bias spans the padded cache; `compare_bias` checks the padding is invisible."""
    return jax_attention.attention_bias(cfg, pos, jax_kv.padded_len(s))


def ref_read(cache, layer: int):
    kv = ref_kv.read(cache, layer)
    return kv.keys(0, kv.length), kv.values(0, kv.length), kv.k_scale, kv.v_scale


def jax_read(cache, layer: int):
    kv = jax_kv.read(cache, layer)
    return kv.keys(0, kv.length), kv.values(0, kv.length), kv.k_scale, kv.v_scale


def padded_bias(bias, cache):
    pad = cache.k[0].shape[2] - bias.shape[-1]
    return jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)


def jax_block(x, p, cfg, cache, layer, pos, bias, rt):
    """The same bias as the reference, padded with -inf to the padded cache."""
    return jax_model.block(x, p, cfg, cache, layer, pos, padded_bias(bias, cache), rt)


def jax_attention_block(x, p, cfg, cache, layer, pos, bias, rt):
    """As `jax_block`: the reference's bias padded with -inf to the padded cache."""
    return jax_model.attention_block(x, p, cfg, cache, layer, pos, padded_bias(bias, cache), rt)


def traced(forward, tracing):
    """A forward run inside `tracing()`, returning the dict of named intermediates it observed.
    Under jit, tracing is opened inside the traced function and the dict is the program's
    output (as `sequence.trace_fn` does)."""

    def run(*args):
        with tracing() as trace:
            forward(*args)
        return trace

    return run


ref_traced = traced(ref_model.forward, ref_model.tracing)
jax_traced = traced(jax_model.forward, ref_model.tracing)  # one observer for both


@functools.partial(jax.jit, static_argnames=("kernel", "scale"))
def attend(q, cache, bias, *, kernel, scale):
    """One JAX attention call on layer 0 (LayerKV is a view, not a pytree: read inside jit)."""
    return kernel(q, jax_kv.read(cache, 0), bias, scale)


# Functions of a LayerKV, on layer 0 of a JAX cache read inside jit (as `attend`).


def jax_block_scores(qg, cache, lo, n: int):
    return jax_key_blocks.block_scores(qg, jax_kv.read(cache, 0), lo, n)


def jax_block_output(p, cache, lo, n: int):
    return jax_key_blocks.block_output(p, jax_kv.read(cache, 0), lo, n)


def jax_row_block(qg, cache, gbias, scale, n: int):
    return jax_slim.row_block(qg, jax_kv.read(cache, 0), gbias, scale, n)


def jax_split_keys_decode(qg, cache, gbias, scale, splits: int, n: int):
    return jax_slim.split_keys_decode(qg, jax_kv.read(cache, 0), gbias, scale, splits, n)


def ref_run_attention(rt, q, kv, bias, scale):
    """The attention function `attention_fn(rt)` looks up, called."""
    return ref_runtime.attention_fn(rt)(q, kv, bias, scale)


def jax_run_attention(rt, q, cache, bias, scale):
    """The same in JAX, with the Runtime itself the static argument: equal Runtimes share one
    program (a partial made per example would compile every example anew)."""
    return jax_runtime.attention_fn(rt)(q, jax_kv.read(cache, 0), bias, scale)


# ---------------------------------------------------------------- input strategies

WIDTH = 8  # e of op-level cases


def x_arrays(last=(WIDTH,), lo=-4.0, hi=4.0):
    return S.shapes(last).flatmap(lambda shape: S.arrays(shape, lo, hi))


RAMP = np.linspace(-1, 1, WIDTH, dtype=np.float32)
# Activations are compared relative to their largest output. Appended anchor inputs keep that
# O(1), as in any hidden state: a tensor of only very negative inputs would compare the last
# bits of 1 + tanh(...) relative to outputs of 1e-5 (a cancellation, not a difference).
ANCHOR = np.array([-2.0, -1.0, 1.0, 2.0], np.float32)
activation_inputs = x_arrays(lo=-20.0).map(
    lambda x: np.concatenate([x, np.broadcast_to(ANCHOR, x.shape[:-1] + (4,))], axis=-1)
)


def norm_inputs(layer: bool):
    """LayerNorm rows get a ramp added: normalising a near-constant row amplifies the rounding
    of its mean by 1/sqrt(eps), a conditioning fact rather than a backend difference."""
    x = x_arrays().map(lambda x: x + RAMP) if layer else x_arrays()
    return st.tuples(
        x,
        S.arrays((WIDTH,), 0.5, 2.0),
        S.arrays((WIDTH,)) if layer else st.none(),
        st.sampled_from((1e-5, 1e-6)),
    )


# A one-layer config of width WIDTH for the functions that read only a few of its fields.
ONE_LAYER = ModelConfig(
    vocab=S.VOCAB,
    width=WIDTH,
    n_layers=1,
    n_heads=2,
    n_kv_heads=2,
    head_dim=4,
    ffn_width=12,
    max_len=S.MAX_LEN,
)


@st.composite
def mlp_inputs(draw, kind: str):
    cfg = ONE_LAYER.replace(mlp=kind, mlp_bias=draw(st.booleans()))
    return draw(x_arrays()), draw(S.params(cfg)).layers[0]


@st.composite
def masked_rows(draw, whole_rows: bool):
    """[2, 6] values with some entries -inf (whole rows too, if `whole_rows`)."""
    x = draw(S.arrays((2, 6)))
    mask = np.array(draw(st.lists(st.booleans(), min_size=12, max_size=12))).reshape(2, 6)
    if not whole_rows:
        mask[:, 0] = False
    return np.where(mask, -np.inf, x).astype(np.float32)


@st.composite
def model_norm_inputs(draw):
    """x, weight, bias (LayerNorm only) and a config naming the norm and its eps."""
    kind = draw(st.sampled_from(tuple(ref_ops.NORMS)))
    x, w, bias, eps = draw(norm_inputs(kind == "layer"))
    return x, w, bias, ONE_LAYER.replace(norm=kind, norm_eps=eps)


@st.composite
def linear_inputs(draw):
    """x [b,t,e], w in a drawn weight format and an optional bias: the reference takes w [e,o]
    as it stores it, JAX takes w [o,e], the device layout (`jaxbackend/params.py`)."""
    o = draw(st.sampled_from((4, 12)))
    x, w = draw(x_arrays()), draw(S.arrays((WIDTH, o), -1.0, 1.0))
    name, group = draw(S.weights())
    w = ref_wf.encode("wq", w, ref_wf.weight_format(name), group)
    bias = draw(st.none() | S.arrays((o,)))
    return Case((x, w, bias), (jnp.asarray(x), device_array("wq", w), to_jax(bias)))


@st.composite
def compact_inputs(draw, table: bool = False):
    """A [rows, 8] matrix encoded in a drawn format (a table [v, e], or a linear weight), and for
    a table some row ids [2, 3]."""
    name, group = draw(S.weights())
    w = draw(S.arrays((12, 8), -3.0, 3.0))
    w = ref_wf.encode("embed" if table else "wq", w, ref_wf.weight_format(name), group)
    if not table:
        return Case((w,), (device_array("wq", w),))
    ids = np.array(draw(st.lists(st.integers(0, 11), min_size=6, max_size=6))).reshape(2, 3)
    return Case((w, ids), (device_array("embed", w), jnp.asarray(ids)))


def jax_widen_logical(w):
    """JAX widening, viewed in the reference's orientation (device weights are [out, in])."""
    return jax_wf.widen(w).T


@st.composite
def int4_codes(draw):
    """Packed int4 bytes [3, 4]: every byte value, not only the codes the quantiser makes."""
    return (
        np.array(draw(st.lists(st.integers(0, 255), min_size=12, max_size=12)), np.uint8).reshape(
            3, 4
        ),
    )


@st.composite
def grouping_inputs(draw, what: str):
    """Arguments of group_queries (q [b,t,h,d], k), group_bias (a bias of every head or one
    shared, [b,h|1,t,s], and k) or ungroup ([b,k,g,t,d])."""
    h, k = draw(st.sampled_from(S.HEADS))
    b, t = draw(S.shapes(()))
    d = draw(st.sampled_from(S.HEAD_DIMS))
    if what == "queries":
        return draw(S.normal((b, t, h, d))), k
    if what == "bias":
        return draw(S.normal((b, draw(st.sampled_from((1, h))), t, 8))), k
    return (draw(S.normal((b, k, h // k, t, d))),)


@st.composite
def rotate_inputs(draw):
    """x [b,t,n,r] and cos, sin [b,t,r/2] of drawn angles, in either pairing style."""
    shape = draw(S.shapes((draw(st.sampled_from((1, 2))), draw(st.sampled_from((4, 8))))))
    angles = draw(S.arrays((*shape[:2], shape[3] // 2), -8.0, 8.0))
    style = draw(st.sampled_from(ROPE_STYLES))
    return draw(S.arrays(shape)), np.cos(angles), np.sin(angles), style


@st.composite
def visible_rows(draw):
    """Bias rows [b,1,1,t,16] (a mask shared by the heads, as `group_bias` leaves it): each row
    sees the columns before its own drawn width in [0, 16] except drawn holes (so the last
    visible column, or none, is any of them)."""
    b, t = draw(S.shapes(()))
    s = 16
    widths = draw(st.lists(st.integers(0, s), min_size=b * t, max_size=b * t))
    holes = draw(st.lists(st.booleans(), min_size=b * t * s, max_size=b * t * s))
    seen = np.arange(s) < np.array(widths).reshape(b, 1, 1, t, 1)  # [b,1,1,t,s]
    seen &= ~np.array(holes).reshape(b, 1, 1, t, s)
    return (np.where(seen, draw(S.normal((b, 1, 1, t, s))), -np.inf).astype(np.float32),)


def rope_configs(pos=("rope", "rope2d")):
    return S.configs().filter(lambda c: c.pos in pos)


def ntk_alphas(cfg: ModelConfig, b: int):
    """Per-row alphas start_state can produce: > 1 only for dynamic-NTK configs."""
    if not isinstance(cfg.rope_scaling, DynamicNTK):
        return st.just(np.ones(b, np.float32))
    alphas = st.sampled_from((1.0, 3.0, 7.0))
    return st.lists(alphas, min_size=b, max_size=b).map(lambda a: np.array(a, np.float32))


@st.composite
def positions_of(draw, cfg: ModelConfig):
    """Positions of t in {1, 3} tokens after a drawn SeqState (prompts, past lengths)."""
    t = draw(st.sampled_from((1, 3)))
    return ref_positions.positions_for(cfg, draw(S.states(cfg, t)), t)


@st.composite
def freq_inputs(draw):
    cfg = draw(rope_configs())
    return cfg, draw(ntk_alphas(cfg, draw(st.sampled_from((1, 3)))))


@st.composite
def angle_inputs(draw):
    cfg = draw(rope_configs(("rope",)))
    b = draw(st.sampled_from((1, 2)))
    ids = draw(st.lists(st.integers(0, S.MAX_LEN - 1), min_size=3 * b, max_size=3 * b))
    return cfg, np.array(ids).reshape(b, 3), draw(ntk_alphas(cfg, b))


@st.composite
def rope_inputs(draw, pos: str):
    cfg = draw(rope_configs((pos,)))
    p = draw(positions_of(cfg))
    b, t = p.slots.shape
    return draw(S.arrays((b, t, cfg.n_heads, cfg.head_dim))), cfg, p


@st.composite
def model_inputs(draw, what: str):
    """Inputs of qkv / embed / unembed / block / forward on a drawn config and weights; block
    and forward write into a cache of a drawn dtype that holds K/V of the past tokens."""
    cfg = draw(S.configs())
    params = draw(S.params(cfg))
    t = draw(st.sampled_from((1, 3)))
    state = draw(S.states(cfg, t))  # what forward takes; the layers take its positions
    pos = ref_positions.positions_for(cfg, state, t)
    b = pos.slots.shape[0]
    x = draw(S.normal((b, t, cfg.width)))
    tokens = np.array(
        draw(st.lists(st.integers(0, S.VOCAB - 1), min_size=b * t, max_size=b * t))
    ).reshape(b, t)
    if what == "qkv":
        return x, params.layers[0], cfg, pos
    if what == "embed":
        return params, cfg, tokens, pos
    if what == "unembed":
        return params, cfg, x
    s = int(pos.slots.max()) + 1 + draw(st.sampled_from((0, 3)))
    cache = past_cache(
        cfg, b, s, draw(st.sampled_from(S.KV_DTYPES)), pos, draw(st.integers(0, 2**32 - 1))
    )
    if what == "block":
        return (
            x,
            params.layers[0],
            cfg,
            cache,
            0,
            pos,
            ref_attention.attention_bias(cfg, pos, s),
            Runtime(),
        )
    return params, cfg, tokens, cache, state, Runtime()


@st.composite
def advance_inputs(draw):
    """A drawn SeqState and the tokens each row wrote: one count, or one per row [b]."""
    state = draw(S.states(draw(S.configs())))
    b = len(state.lengths)
    per_row = st.lists(st.integers(0, 8), min_size=b, max_size=b).map(np.array)
    return state, draw(st.integers(0, 8) | per_row)


def past_cache(cfg: ModelConfig, b: int, s: int, dtype: str, pos, seed: int):
    """A cache of length s holding random K/V at every slot before each row's first query (what
    earlier steps would have written), in every layer."""
    rng = np.random.default_rng(seed)
    cache = ref_kv.init_cache(cfg, b, s, dtype)
    slots = np.broadcast_to(np.arange(s), (b, s))
    before = (slots < pos.slots[:, :1])[:, :, None, None]
    for layer in range(cfg.n_layers):
        k, v = (
            rng.standard_normal((b, s, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
            for _ in "kv"
        )
        cache = ref_kv.write(cache, layer, k * before, v * before, slots)
    return cache


@st.composite
def write_inputs(draw):
    """An empty 2-layer cache and t tokens per row for one layer, each row at its own drawn
    run of consecutive slots."""
    case = draw(S.attention_cases())
    b, n = case.k.shape[:2]
    cache = ref_kv.init_cache(case.cfg.replace(n_layers=2), b, case.length, case.kv_dtype)
    starts = draw(st.lists(st.integers(0, case.length - n), min_size=b, max_size=b))
    slots = np.asarray(starts)[:, None] + np.arange(n)[None, :]
    return cache, draw(st.sampled_from((0, 1))), case.k, case.v, slots


init_cache_inputs = st.tuples(
    S.configs(),
    st.sampled_from((1, 2)),
    st.sampled_from((1, 30, 64, 65, 257)),  # padded to 64, 64, 64, 128 and 512 slots
    st.sampled_from(S.KV_DTYPES),
)
encode_inputs = st.tuples(x_arrays((2, 8), lo=-100, hi=100), st.sampled_from(S.KV_DTYPES))


def attention_arguments(case: S.AttentionCase):
    """(q, LayerKV, bias, scale) for the reference and (q, padded cache, padded bias) for JAX,
    holding the same stored values (`AttentionCase.jax`)."""
    q, kv, bias, scale = case.reference()
    jq, cache, jbias, _ = case.jax()
    return (q, kv, bias, scale), (jq, cache, jbias)


@st.composite
def key_block_inputs(draw, output: bool):
    """Grouped queries [b,k,g,t,d] (or weights p [b,k,g,t,n] for `block_output`) and layer 0 of
    a cache of a drawn dtype, read in a block of n in {1, 4, 16} slots from a drawn start: the
    reference takes bounds [lo, lo + n), JAX (lo, n) with n static."""
    case = draw(S.attention_cases())
    (q, kv, _, _), (_, cache, _) = attention_arguments(case)
    n = draw(st.sampled_from([size for size in (1, 4, 16) if size <= case.length]))
    lo = draw(st.integers(0, case.length - n))
    kh = kv.k.shape[1]
    if output:
        b, t, h, _ = q.shape
        x = np.abs(draw(S.normal((b, kh, h // kh, t, n))))  # softmax-like weights, >= 0
    else:
        x = ref_attention.group_queries(q, kh)
    return Case((x, kv, lo, lo + n), (jnp.asarray(x), cache, lo, n))


@st.composite
def slim_inputs(draw, decode: bool):
    """One query-row block (all t rows) or one decode step over a cache of a drawn dtype, queries
    and bias grouped; JAX reads key blocks of n in {16, 64} slots (dividing its 64-slot cache),
    which the reference's `row_block` takes as its key block and `split_keys_decode` does not
    (it splits the visible keys into chunks of its own)."""
    case = draw(S.attention_cases(t=1 if decode else None))
    (q, kv, bias, scale), (jq, cache, jbias) = attention_arguments(case)
    kh = kv.k.shape[1]
    qg, gbias = ref_attention.group_queries(q, kh), ref_attention.group_bias(bias, kh)
    jqg, jgbias = jnp.asarray(qg), jnp.asarray(ref_attention.group_bias(np.asarray(jbias), kh))
    n = draw(st.sampled_from((16, 64)))
    if decode:
        splits = draw(st.sampled_from((1, 2, 3)))
        return Case((qg, kv, gbias, scale, splits), (jqg, cache, jgbias, scale, splits, n))
    return Case((qg, kv, gbias, scale, n), (jqg, cache, jgbias, scale, n))


@st.composite
def runtime_inputs(draw):
    """A drawn Runtime (attention kind and options) and an attention case of its cache dtype."""
    case = draw(S.attention_cases())
    rt = draw(S.runtimes(kv_dtype=case.kv_dtype))
    (q, kv, bias, scale), (jq, cache, jbias) = attention_arguments(case)
    return Case((rt, q, kv, bias, scale), (rt, jq, cache, jbias, scale))


@st.composite
def bias_inputs(draw):
    """Half the configs switched to ALiBi with 4 or 6 heads (both branches of the slopes)."""
    cfg = draw(S.configs())
    if draw(st.booleans()):
        h = draw(st.sampled_from((4, 6)))
        cfg = cfg.replace(pos="alibi", n_heads=h, n_kv_heads=2, rope_scaling=None, logn_len=0)
    pos = draw(positions_of(cfg))
    return cfg, pos, int(pos.slots.max()) + 1 + draw(st.sampled_from((0, 3)))


SAMPLINGS = st.builds(
    SamplingConfig,
    temperature=st.sampled_from((0.0, 0.7, 1.0, 1.5)),
    top_k=st.sampled_from((0, 1, 3, 20)),
    top_p=st.sampled_from((1.0, 0.5, 0.9)),
    min_p=st.sampled_from((0.0, 0.05, 0.3)),
    repetition_penalty=st.sampled_from((1.0, 1.3, 0.8)),
)


@st.composite
def logits_and_seen(draw, b: int = 2):
    v = draw(st.sampled_from((8, 32)))
    seen = draw(st.lists(st.booleans(), min_size=b * v, max_size=b * v))
    return draw(S.arrays((b, v), -8.0, 8.0)), np.array(seen).reshape(b, v)


logits = logits_and_seen().map(lambda a: a[0])
seeds = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=3).map(
    lambda s: np.array(s, np.int64)
)
words = st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3).map(
    lambda w: np.array(w, np.uint32)
)


@st.composite
def seeded(draw, with_logits: bool):
    """(seeds int64 [b], step) for the reference; JAX takes the seeds as [b, 2] uint32 words."""
    if with_logits:
        x, seen = draw(logits_and_seen())
        sc = draw(SAMPLINGS)
        seed = draw(seeds)[:1].repeat(2)
        step = draw(st.integers(0, 1000))
        words_ = jnp.asarray(jax_sampling.seed_words(seed))
        return Case(
            (x, sc, seen, seed, step), (jnp.asarray(x), sc, jnp.asarray(seen), words_, step)
        )
    seed, step = draw(seeds), draw(st.integers(0, 2**31 - 1))
    return Case((seed, step), (jnp.asarray(jax_sampling.seed_words(seed)), step))


# ---------------------------------------------------------------- the table


def attention_pair(kind: str, dtype: str) -> Pair:
    """An attention kind over a cache of `dtype`: both backends read the SAME stored values
    (`AttentionCase.jax` pads the reference's cache and bias), so FUNCTION[dtype] holds."""
    ref_fn, jax_fn = ref_runtime.ATTENTION[kind], jax_runtime.ATTENTION[kind]

    def reference(case, options):
        return S.Kernel(ref_fn, S.backend_options("numpy", kind, options))(*case.reference())

    def jax_call(case, options):
        q, cache, bias, scale = case.jax()
        return attend(q, cache, bias, kernel=S.Kernel(jax_fn, options), scale=scale)

    inputs = st.tuples(S.attention_cases(dtype), S.attention_options(kind))
    name = f"{ref_fn.__module__.rsplit('.', 1)[-1]}.{ref_fn.__name__}[{dtype}]"
    cases = inputs.map(lambda a: Case(a, a))
    return Pair(name, reference, jax_call, cases, close(FUNCTION[dtype]), None, cost=15)


def ref_exact_rows(case, key_block: int):
    """The reference's key-blocked attention over the whole cache, from an AttentionCase."""
    q, kv, bias, scale = case.reference()
    kh = kv.k.shape[1]
    qg, gbias = ref_attention.group_queries(q, kh), ref_attention.group_bias(bias, kh)
    return ref_key_blocks.exact_rows(qg, kv, gbias, scale, kv.length, key_block)


@functools.partial(jax.jit, static_argnames=("scale", "key_block"))
def jax_exact_rows_jit(q, cache, bias, *, scale, key_block):
    kv = jax_kv.read(cache, 0)
    kh = kv.k.shape[1]
    qg, gbias = jax_attention.group_queries(q, kh), jax_attention.group_bias(bias, kh)
    return jax_key_blocks.exact_rows(qg, kv, gbias, scale, kv.length, key_block)


def jax_exact_rows(case, key_block: int):
    """The same over the padded JAX cache (padding slots are masked)."""
    q, cache, bias, scale = case.jax()
    return jax_exact_rows_jit(q, cache, bias, scale=scale, key_block=key_block)


def exact_rows_pair(dtype: str) -> Pair:
    """The key-blocked form SlimAttention and flash share, over a cache of `dtype`, read in key
    blocks that divide the padded JAX cache (the reference's last block may be shorter)."""
    inputs = st.tuples(S.attention_cases(dtype), st.sampled_from((16, 64)))
    return Pair(
        f"key_blocks.exact_rows[{dtype}]",
        ref_exact_rows,
        jax_exact_rows,
        inputs.map(lambda a: Case(a, a)),
        close(FUNCTION[dtype]),
        None,
        cost=15,
    )


# Inputs of the table's entries, as Case strategies.
int8_codes = st.lists(st.integers(-127, 127), min_size=16, max_size=16).map(
    lambda q: np.array(q, np.int8).reshape(2, 8)
)
dequantize_inputs = st.tuples(int8_codes, S.arrays((2,), 0.0, 1.0))
wavelength_inputs = st.tuples(S.arrays((2, 8), 2.0**-10, 2.0), st.just(S.WAVELENGTH))
logn_inputs = rope_inputs("rope").map(lambda a: (a[1].replace(logn_len=S.LOGN_LEN), a[2]))
learned_inputs = (
    S.configs()
    .filter(lambda c: c.pos == "learned")
    .flatmap(
        lambda cfg: st.tuples(
            S.params(cfg).map(lambda p: p.pos_embed), st.just(cfg), positions_of(cfg)
        )
    )
)
positions_for_inputs = S.configs().flatmap(
    lambda cfg: st.tuples(st.just(cfg), S.states(cfg, 4), st.sampled_from((1, 4)))
)
read_inputs = write_inputs().map(lambda a: (ref_kv.write(*a), a[1]))
penalty_inputs = st.tuples(logits_and_seen(), st.sampled_from((1.0, 1.3, 0.8))).map(
    lambda a: (*a[0], a[1])
)
process_inputs = st.tuples(logits_and_seen(), SAMPLINGS).map(lambda a: (a[0][0], a[1], a[0][1]))


# The table is kept one entry per line or two (fmt: off): as a table it reads and diffs better
# than ruff's one-argument-per-line layout. Fields: name, reference, JAX twin, inputs, compare,
# static argument positions under jit (None: call as is), cost.
# fmt: off
def _pairs() -> list[Pair]:
    P, V = Pair, same_values
    ops = [
        P("ops.rms_norm", ref_ops.rms_norm, jax_ops.rms_norm, V(norm_inputs(False)), close(), (3,)),
        P("ops.layer_norm", ref_ops.layer_norm, jax_ops.layer_norm, V(norm_inputs(True)), close(),
          (3,)),
        P("ops.silu", ref_ops.silu, jax_ops.silu, V(st.tuples(activation_inputs)), close()),
        P("ops.gelu_tanh", ref_ops.gelu_tanh, jax_ops.gelu_tanh, V(st.tuples(activation_inputs)),
          close()),
        P("ops.relu", ref_ops.relu, jax_ops.relu, V(st.tuples(x_arrays())), exact),
        P("ops.linear", ref_ops.linear, jax_ops.linear, linear_inputs(), close()),
        *(P(f"ops.{kind}_mlp", ref_ops.MLPS[kind], jax_ops.MLPS[kind], V(mlp_inputs(kind)), close())
          for kind in ref_ops.MLPS),
        P("ops.softmax", ref_ops.softmax, jax_ops.softmax, V(st.tuples(masked_rows(True))),
          close()),
        P("ops.log_softmax", ref_ops.log_softmax, jax_ops.log_softmax,
          V(st.tuples(masked_rows(False))), masked_close),
        P("quant.quantize", ref_quant.quantize, jax_quant.quantize,
          V(st.tuples(x_arrays((3, 8), lo=-100, hi=100))), compare_quantized),
        P("quant.dequantize", ref_quant.dequantize, jax_quant.dequantize, V(dequantize_inputs),
          close()),
        P("weight_format.dequantize", ref_wf.dequantize, jax_wf.dequantize,
          V(st.tuples(int8_codes, S.arrays((2, 4), 0.0, 1.0))), close()),
        P("weight_format.unpack_int4", ref_wf.unpack_int4, jax_wf.unpack_int4, V(int4_codes()),
          exact),
        P("weight_format.widen", ref_wf.widen, jax_widen_logical, compact_inputs(), exact, None),
        P("weight_format.take_rows", ref_wf.take_rows, jax_wf.take_rows, compact_inputs(True),
          exact, None),
    ]
    positions = [
        P("positions.inv_freq", ref_inv_freq, jax_positions.inv_freq, V(freq_inputs()), close(),
          (0,), cost=3),
        P("positions.wavelength_scale", ref_positions.wavelength_scale,
          jax_positions.wavelength_scale, V(wavelength_inputs), close(), (1,)),
        P("positions.rope_angles", ref_positions.rope_angles, jax_positions.rope_angles,
          V(angle_inputs()), compare_angles, (0,), cost=3),
        P("positions.apply_rope", ref_positions.apply_rope, jax_positions.apply_rope,
          V(rope_inputs("rope")), close(), (1,), cost=3),
        P("positions.apply_rope2d", ref_positions.apply_rope2d, jax_positions.apply_rope2d,
          V(rope_inputs("rope2d")), close(), (1,), cost=3),
        P("positions.logn_scale", ref_positions.logn_scale, jax_positions.logn_scale,
          V(logn_inputs), close(), (0,), cost=3),
        P("positions.learned_positions", ref_positions.learned_positions,
          jax_positions.learned_positions, V(learned_inputs), exact, (1,), cost=3),
        P("positions.positions_for", ref_positions.positions_for, jax_positions.positions_for,
          V(positions_for_inputs), compare_positions, (0, 2), cost=3),
        P("positions.advance", ref_positions.advance, jax_positions.advance, V(advance_inputs()),
          compare_state),
        P("positions.rotate", ref_positions.rotate, jax_positions.rotate, V(rotate_inputs()),
          close(), (3,)),
        P("positions.no_rotation", ref_positions.no_rotation, jax_positions.no_rotation,
          V(st.sampled_from(("alibi", "learned")).flatmap(rope_inputs)), exact, (1,), cost=3),
    ]
    attention = [
        P("attention.visible", ref_attention.visible, jax_attention.visible,
          V(bias_inputs().map(lambda a: a[1:])), exact, (1,)),
        P("attention.attention_bias", ref_attention.attention_bias, jax_bias, V(bias_inputs()),
          compare_bias, (0, 2)),
        P("attention.group_queries", ref_attention.group_queries, jax_attention.group_queries,
          V(grouping_inputs("queries")), exact, (1,)),
        P("attention.group_bias", ref_attention.group_bias, jax_attention.group_bias,
          V(grouping_inputs("bias")), exact, (1,)),
        P("attention.ungroup", ref_attention.ungroup, jax_attention.ungroup,
          V(grouping_inputs("out")), exact),
        *(attention_pair(kind, dtype) for kind in S.ATTENTION_KINDS for dtype in S.KV_DTYPES),
        *(exact_rows_pair(dtype) for dtype in S.KV_DTYPES),
        P("key_blocks.block_scores", ref_key_blocks.block_scores, jax_block_scores,
          key_block_inputs(False), close(), (3,), cost=3),
        P("key_blocks.block_output", ref_key_blocks.block_output, jax_block_output,
          key_block_inputs(True), close(), (3,), cost=3),
        P("slim_attention.last_visible", ref_slim.last_visible, jax_slim.last_visible,
          V(visible_rows()), exact),
        P("slim_attention.row_block", ref_slim.row_block, jax_row_block, slim_inputs(False),
          close(), (3, 4), cost=8),
        P("slim_attention.split_keys_decode", ref_slim.split_keys_decode, jax_split_keys_decode,
          slim_inputs(True), close(), (3, 4, 5), cost=8),
        P("runtime.attention_fn", ref_run_attention, jax_run_attention, runtime_inputs(),
          close(), (0, 4), cost=15),
        P("kv_cache.init_cache", ref_kv.init_cache, jax_kv.init_cache, V(init_cache_inputs),
          compare_init, None),
        P("kv_cache.encode", ref_kv.encode, jax_kv.encode, V(encode_inputs), compare_encoded,
          (1,)),
        P("kv_cache.write", ref_kv.write, jax_kv.write, V(write_inputs()), compare_write, (1,),
          cost=3),
        P("kv_cache.read", ref_read, jax_read, V(read_inputs), compare_read, (1,), cost=3),
    ]
    model = [
        P("model.norm", ref_model.norm, jax_model.norm, V(model_norm_inputs()), close(), (3,)),
        P("model.qkv", ref_model.qkv, jax_model.qkv, V(model_inputs("qkv")), close(), (2,),
          cost=3),
        P("model.embed", ref_model.embed, jax_model.embed, V(model_inputs("embed")), close(),
          (1,), cost=3),
        P("model.unembed", ref_model.unembed, jax_model.unembed, V(model_inputs("unembed")),
          close(), (1,), cost=3),
        P("model.block", ref_model.block, jax_block, V(model_inputs("block")), compare_layer,
          (2, 4, 7), cost=8),
        P("model.attention_block", ref_model.attention_block, jax_attention_block,
          V(model_inputs("block")), compare_layer, (2, 4, 7), cost=8),
        P("model.forward", ref_model.forward, jax_model.forward, V(model_inputs("forward")),
          compare_layer, (1, 5), cost=8),
        # static as model.forward's
        P("model.tracing", ref_traced, jax_traced, V(model_inputs("forward")), compare_traces,
          (1, 5), cost=8),
    ]
    sampling = [
        P("sampling.rotl", ref_sampling.rotl, jax_sampling.rotl,
          V(st.tuples(words, st.integers(1, 31))), exact, (1,)),
        P("sampling.threefry2x32", ref_sampling.threefry2x32, jax_sampling.threefry2x32,
          V(st.tuples(words, words, words, words)), exact),
        P("sampling.uniform", ref_sampling.uniform, jax_sampling.uniform, seeded(False), exact),
        P("sampling.repetition_penalty", ref_sampling.repetition_penalty,
          jax_sampling.repetition_penalty, V(penalty_inputs), masked_close, (2,)),
        P("sampling.top_k_filter", ref_sampling.top_k_filter, jax_sampling.top_k_filter,
          V(st.tuples(logits, st.sampled_from((0, 1, 3, 7, 40)))), exact, (1,)),
        P("sampling.top_p_filter", ref_sampling.top_p_filter, jax_sampling.top_p_filter,
          V(st.tuples(logits, st.sampled_from((0.1, 0.5, 0.9, 1.0)))),
          decisions(one_filter("top_p")), (1,), cost=3),
        P("sampling.min_p_filter", ref_sampling.min_p_filter, jax_sampling.min_p_filter,
          V(st.tuples(logits, st.sampled_from((0.0, 0.05, 0.3, 1.0)))),
          decisions(one_filter("min_p")), (1,)),
        P("sampling.process", ref_sampling.process, jax_sampling.process, V(process_inputs),
          decisions(process_sampling), (1,), cost=3),
        P("sampling.choose", ref_sampling.choose, jax_sampling.choose,
          V(st.tuples(masked_rows(False), S.arrays((2,), 0.0, 0.999))),
          decisions(choose_sampling)),
        P("sampling.sample", ref_sampling.sample, jax_sampling.sample, seeded(True),
          decisions(sample_sampling), (1,), cost=3),
    ]
    return ops + positions + attention + model + sampling
# fmt: on


PAIRS: list[Pair] = _pairs()
BY_NAME = {pair.name: pair for pair in PAIRS}
