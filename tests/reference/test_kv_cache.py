"""KV cache storage: the int8 quantiser bit for bit, dtype round trips, sizes, no float copies."""

import tracemalloc

import numpy as np
import pytest

from slimllm.conformance.tolerances import QUANTUM, THROUGH_CACHE, assert_close
from slimllm.reference import kv_cache, positions
from slimllm.reference.attention import attention_bias
from slimllm.reference.config import ModelConfig
from slimllm.reference.model import forward
from slimllm.reference.params import init_params
from slimllm.reference.quant import dequantize, from_bf16_bits, quantize, to_bf16_bits
from slimllm.reference.runtime import ATTENTION, Runtime

# Attention kinds that read the cache one key block at a time (naive, the definition, does not).
KEY_BLOCKED = [kind for kind in ATTENTION if kind != "naive"]


def test_quantize_hand_checked_vectors():
    # amax 254 -> x * 127/254 = x / 2: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2 (round half to even)
    q, s = quantize(np.array([254.0, 1.0, 3.0, -5.0], np.float32))
    assert q.tolist() == [127, 0, 2, -2] and q.dtype == np.int8
    assert s == np.float32(254.0) / np.float32(127.0)
    # amax 1: x * 127 -> -63.5 rounds to -64, 31.75 to 32; the extreme is exactly +-127
    q, s = quantize(np.array([-1.0, -0.5, 0.25, 0.0], np.float32))
    assert q.tolist() == [-127, -64, 32, 0] and s == np.float32(1 / 127)
    # amax 0: all zeros, scale 0 (no division by zero)
    q, s = quantize(np.zeros((2, 3), np.float32))
    assert not q.any() and s.tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(dequantize(q, s), np.zeros((2, 3)))


def test_quantize_never_produces_minus_128_and_error_is_bounded():
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32) * 10
    q, s = quantize(x)
    assert q.min() >= -127 and q.max() <= 127
    err = np.abs(dequantize(q, s) - x)
    assert np.all(err <= s[:, None] / 2 * (1 + 1e-5))


def test_bf16_bits_round_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -3.5, 1e-40], np.float32)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa -> 1.0; 1 + 3*2^-8 -> 1 + 2^-6
    np.testing.assert_array_equal(from_bf16_bits(to_bf16_bits(x))[:4], [1.0, 1.0, 1.015625, -3.5])


CFG = ModelConfig(
    vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=48, max_len=32
)


@pytest.mark.parametrize("dtype", kv_cache.KV_DTYPES)
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_prefill_equals_decode_steps_for_every_dtype_and_attention(dtype, attention):
    """Attention reads K/V back from the cache after writing, so one prefill of T tokens and T
    single steps see the same (quantised) keys and values."""
    params = init_params(CFG, seed=5)
    tokens = np.random.default_rng(1).integers(0, 64, (2, 7))
    cache = kv_cache.init_cache(CFG, 2, 10, dtype)
    full, full_cache = forward(
        params,
        CFG,
        tokens,
        cache,
        positions.start_state(CFG, tokens),
        Runtime("numpy", attention),
    )
    steps = []
    for i in range(7):
        logits, cache = forward(
            params,
            CFG,
            tokens[:, i : i + 1],
            cache,
            positions.advance(positions.start_state(CFG, tokens), i),
            Runtime("numpy", attention),
        )
        steps.append(logits[:, 0])
    assert_close(np.stack(steps, 1), full, THROUGH_CACHE[dtype], f"{attention}/{dtype}")
    # Stored values agree up to one storage quantum (a last-bit float32 difference may round
    # to the neighbouring fp16/bf16 value or int8 step).
    quantum = QUANTUM[dtype]
    for layer in range(CFG.n_layers):
        for a, b in zip(
            kv_cache.dequantized(kv_cache.read(full_cache, layer)),
            kv_cache.dequantized(kv_cache.read(cache, layer)),
        ):
            assert np.abs(a - b).max() <= quantum * np.abs(b).max() * 1.01


def test_cache_sizes():
    cfg = CFG.replace(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128)  # Llama-3-8B shaped
    assert kv_cache.nbytes_per_token(cfg, "float16") == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_cache.nbytes_per_token(cfg, "int8") == 2 * 32 * 8 * (128 + 4)
    assert kv_cache.nbytes_per_token(cfg, "float32") == 2 * kv_cache.nbytes_per_token(
        cfg, "bfloat16"
    )
    with pytest.raises(ValueError, match="unknown kv cache dtype 'int4'"):
        kv_cache.init_cache(cfg, 1, 4, "int4")


def test_write_refuses_slots_past_the_cache_or_not_consecutive():
    cache = kv_cache.init_cache(CFG, 2, 8, "float32")
    kv = np.zeros((2, 3, CFG.n_kv_heads, CFG.head_dim), np.float32)
    ok = np.array([[0, 1, 2], [5, 6, 7]])  # each row its own run
    assert kv_cache.write(cache, 0, kv, kv, ok).max_len == 8
    with pytest.raises(ValueError, match="needs 9 positions but the cache holds 8"):
        kv_cache.write(cache, 0, kv, kv, ok + 1)
    with pytest.raises(ValueError, match="slots must be consecutive"):
        kv_cache.write(cache, 0, kv, kv, np.array([[0, 1, 2], [4, 6, 7]]))


@pytest.mark.parametrize("attention", KEY_BLOCKED)
def test_int8_attention_never_builds_a_float_copy_of_the_cache(attention):
    """Decode over a 4096-token int8 cache: the peak of new allocations stays far below the size
    a float32 copy of K (or V) would take, because keys are widened one block at a time. (Naive
    attention, the definition, dequantises the layer on purpose: it is not among these.)"""
    cfg = CFG.replace(n_kv_heads=2, head_dim=64, n_heads=4, width=256)
    s = 4096
    cache = kv_cache.init_cache(cfg, 1, s, "int8")
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, s, 2, 64)).astype(np.float32)
    cache = kv_cache.write(cache, 0, k, k, np.arange(s)[None])
    kv = kv_cache.read(cache, 0)
    pos = positions.positions_for(
        cfg, positions.advance(positions.start_state(cfg, [[0]]), s - 1), 1
    )
    bias = attention_bias(cfg, pos, s)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    float_copy = kv.k.size * 4  # bytes of one float32 copy of this layer's keys
    tracemalloc.start()
    ATTENTION[attention](q, kv, bias, 0.125)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < float_copy / 4, f"peak {peak} bytes vs a float copy of {float_copy}"
