"""Whole-model invariants of the reference on random tiny configs."""

import numpy as np
import pytest

from slimllm.reference import kv_cache, positions
from slimllm.reference.config import DynamicNTK, ModelConfig, WavelengthScaling
from slimllm.reference.model import TRACE, TRACE_KEYS, forward, observe, tracing
from slimllm.reference.params import check_params, init_params

BASE = ModelConfig(
    vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=48, max_len=32
)
# One entry per combination of features the families use (names say the maths, not a family).
VARIANTS = {
    "rope_gqa": BASE,
    "interleaved_tied": BASE.replace(rope_style="interleaved", tied_head=True),
    "wavelength_scaling": BASE.replace(
        rope_scaling=WavelengthScaling(8.0, 1.0, 4.0, 16), rope_theta=5e5
    ),
    "bias_qknorm": BASE.replace(qkv_bias=True, qk_norm=True, head_dim=16),
    "partial_interleaved": BASE.replace(rope_fraction=0.5, rope_style="interleaved", qkv_bias=True),
    "logn": BASE.replace(logn_len=4, qkv_bias=True, n_kv_heads=4),
    "alibi": BASE.replace(pos="alibi", n_heads=6, n_kv_heads=6, width=48),
    "rope2d_prefix_gelu_alpha": BASE.replace(
        pos="rope2d",
        norm="layer",
        mlp="gelu",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        residual="normed_input",
        residual_alpha=3.0,
        tied_head=True,
        rope_f16_freqs=True,
        block_start_id=5,
        block_anchor_ids=(4, 3),
    ),
    "learned_post_norm_proj": BASE.replace(
        pos="learned",
        pos_offset=2,
        norm="layer",
        mlp="relu",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        residual="post_norm",
        final_norm=False,
        tied_head=True,
        embed_width=16,
    ),
}


def prefill_and_steps(cfg, params, tokens):
    """One prefill of all tokens vs single-token steps. A prefix-LM prefix attends both ways, so
    it must be prefilled as one chunk; every token after it is a single step."""
    t = tokens.shape[1]
    cache = kv_cache.init_cache(cfg, 1, 16)
    state = positions.start_state(cfg, tokens.tolist())
    full, full_cache = forward(params, cfg, tokens, cache, state)
    first = int(state.prefix[0]) + 1 if cfg.prefix_lm else 1
    logits, cache = forward(params, cfg, tokens[:, :first], cache, state)
    steps = [logits[:, i] for i in range(first)]
    for i in range(first, t):
        logits, cache = forward(
            params,
            cfg,
            tokens[:, i : i + 1],
            cache,
            positions.advance(state, i),
        )
        steps.append(logits[:, 0])
    return full, full_cache, np.stack(steps, 1), cache


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_equals_single_token_steps(name):
    cfg = VARIANTS[name]
    params = init_params(cfg, seed=1)
    check_params(params, cfg)
    tokens = np.random.default_rng(0).integers(6, cfg.vocab, (1, 9))
    tokens[0, 3:5] = [4, 5]  # mask and block-start tokens for the prefix-LM variant
    full, full_cache, steps, step_cache = prefill_and_steps(cfg, params, tokens)
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(full_cache.k + full_cache.v, step_cache.k + step_cache.v):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cache_overflow_is_an_error():
    params = init_params(BASE)
    cache = kv_cache.init_cache(BASE, 1, 4)
    with pytest.raises(ValueError, match="cache holds 4"):
        forward(params, BASE, np.zeros((1, 5), int), cache, positions.start_state(BASE, [[0]]))


def test_token_out_of_vocab_is_an_error():
    params = init_params(BASE)
    cache = kv_cache.init_cache(BASE, 1, 4)
    with pytest.raises(ValueError, match="out of range"):
        forward(params, BASE, np.array([[64]]), cache, positions.start_state(BASE, [[0]]))


def test_config_rejects_unknown_axis_values():
    with pytest.raises(ValueError, match="norm='batch'"):
        BASE.replace(norm="batch")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        BASE.replace(n_kv_heads=3)
    with pytest.raises(ValueError, match="logN query scaling with rope2d"):
        VARIANTS["rope2d_prefix_gelu_alpha"].replace(logn_len=4)
    with pytest.raises(ValueError, match="rotary dim > 2"):
        BASE.replace(head_dim=4, width=16, rope_fraction=0.5, rope_scaling=DynamicNTK(2))
    with pytest.raises(ValueError, match="expected None or one of .'WavelengthScaling'"):
        BASE.replace(rope_scaling=("dynamic_ntk", 8))  # the old tagged-tuple form
    # a scaled config stays hashable and comparable by value (a static jit argument)
    scaled = VARIANTS["wavelength_scaling"]
    assert hash(scaled) == hash(scaled.replace()) and scaled == scaled.replace()


def test_residual_layouts_by_hand():
    """post_norm and normed_input blocks equal their formulas written out with the same parts."""
    from slimllm.reference import model as m
    from slimllm.reference.ops import MLPS

    for name in ("learned_post_norm_proj", "rope2d_prefix_gelu_alpha"):
        cfg = VARIANTS[name]
        p = init_params(cfg, seed=2)
        layer = p.layers[0]
        x = np.random.default_rng(1).standard_normal((1, 6, cfg.width)).astype(np.float32)
        tokens = [[7, 8, 9, 4, 5, 9]]
        state = positions.start_state(cfg, tokens)
        pos = positions.positions_for(cfg, state, 6)
        bias = m.attention_bias(cfg, pos, 8)
        cache = kv_cache.init_cache(cfg, 1, 8)
        got, _ = m.block(x, layer, cfg, cache, 0, pos, bias)
        mlp = MLPS[cfg.mlp]
        if cfg.residual == "post_norm":
            a, _ = m.attention_block(x, layer, cfg, cache, 0, pos, bias)
            h = m.norm(x + a, layer.attn_norm, layer.attn_norm_b, cfg)
            want = m.norm(h + mlp(h, layer), layer.mlp_norm, layer.mlp_norm_b, cfg)
        else:
            n = m.norm(x, layer.attn_norm, layer.attn_norm_b, cfg)
            a, _ = m.attention_block(n, layer, cfg, cache, 0, pos, bias)
            h = 3.0 * n + a
            n2 = m.norm(h, layer.mlp_norm, layer.mlp_norm_b, cfg)
            want = 3.0 * n2 + mlp(n2, layer)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_dynamic_ntk_alpha_is_fixed_by_the_prompt():
    """Dynamic NTK: a prompt past the trained length stretches the base for the whole sequence
    (the alpha chosen at prefill is kept), so prefill differs from single steps by design."""
    cfg = BASE.replace(rope_scaling=DynamicNTK(4), logn_len=4)
    params = init_params(cfg, seed=4)
    tokens = [[3, 9, 1, 7, 2, 8, 6, 5, 4]]  # 9 > 4: alpha = 2^ceil(log2(9/4) + 1) - 1 = 7
    state = positions.start_state(cfg, tokens)
    assert state.ntk_alpha[0] == 7.0
    short = positions.start_state(cfg, [tokens[0][:4]])
    assert short.ntk_alpha[0] == 1.0
    cache = kv_cache.init_cache(cfg, 1, 16)
    a, _ = forward(params, cfg, np.array(tokens), cache, state)
    b, _ = forward(
        params,
        cfg,
        np.array(tokens),
        cache,
        positions.SeqState(state.lengths, state.prefix, state.anchor, short.ntk_alpha),
    )
    np.testing.assert_allclose(a[:, :1], b[:, :1], rtol=1e-5, atol=1e-5)  # position 0: no rotation
    assert not np.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_tracing_observes_every_named_intermediate_and_changes_nothing():
    """Inside `tracing()` a forward keeps every TRACE_KEYS name (per layer), in computation
    order, and returns the same logits as untraced; outside it `observe` only passes x on."""
    cfg = BASE
    params = init_params(cfg, seed=1)
    tokens = np.array([[3, 9, 1, 7]])

    def run():
        cache = kv_cache.init_cache(cfg, 1, 8)
        return forward(params, cfg, tokens, cache, positions.start_state(cfg, tokens))[0]

    plain = run()
    with tracing() as trace:
        traced = run()
    np.testing.assert_array_equal(traced, plain)
    np.testing.assert_array_equal(trace["logits"], plain)
    layers = [key for key in TRACE_KEYS if "{i}" in key]
    want = ["embed"] + [k.format(i=i) for i in range(cfg.n_layers) for k in layers]
    assert list(trace) == want + ["final_norm", "logits"]
    assert TRACE.get() is None
    x = np.ones(3)
    assert observe("embed", x) is x and TRACE.get() is None
