"""Whole-model invariants of the reference on random tiny configs."""

import numpy as np
import pytest

from slimllm.reference import kv_cache, positions
from slimllm.reference.config import ModelConfig
from slimllm.reference.model import forward
from slimllm.reference.params import check_params, init_params

BASE = ModelConfig(vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   ffn_width=48, max_len=32)
VARIANTS = {
    "llama": BASE,
    "interleaved_tied": BASE.replace(rope_style="interleaved", tied_head=True),
    "llama3_scaling": BASE.replace(rope_scaling=("llama3", 8.0, 1.0, 4.0, 16), rope_theta=5e5),
}


def prefill_and_steps(cfg, params, tokens):
    t = tokens.shape[1]
    cache = kv_cache.init_cache(cfg, 1, 16)
    full, full_cache = forward(params, cfg, tokens, cache, positions.simple_positions(cfg, 1, t))
    steps = []
    for i in range(t):
        logits, cache = forward(params, cfg, tokens[:, i : i + 1], cache,
                                positions.simple_positions(cfg, 1, 1, start=i))
        steps.append(logits[:, 0])
    return full, full_cache, np.stack(steps, 1), cache


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_equals_single_token_steps(name):
    cfg = VARIANTS[name]
    params = init_params(cfg, seed=1)
    check_params(params, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (1, 9))
    full, full_cache, steps, step_cache = prefill_and_steps(cfg, params, tokens)
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(full_cache.k + full_cache.v, step_cache.k + step_cache.v):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cache_overflow_is_an_error():
    params = init_params(BASE)
    cache = kv_cache.init_cache(BASE, 1, 4)
    with pytest.raises(ValueError, match="cache holds 4"):
        forward(params, BASE, np.zeros((1, 5), int), cache, positions.simple_positions(BASE, 1, 5))


def test_token_out_of_vocab_is_an_error():
    params = init_params(BASE)
    cache = kv_cache.init_cache(BASE, 1, 4)
    with pytest.raises(ValueError, match="out of range"):
        forward(params, BASE, np.array([[64]]), cache, positions.simple_positions(BASE, 1, 1))


def test_config_rejects_unknown_axis_values():
    with pytest.raises(ValueError, match="norm='batch'"):
        BASE.replace(norm="batch")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        BASE.replace(n_kv_heads=3)
