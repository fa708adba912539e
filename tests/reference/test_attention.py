"""Attention: naive is checked against a per-element loop; the key-blocked form (the paper's
hybrid int8 matmuls), SlimAttention and the flash baseline against naive on Hypothesis-drawn
shapes, masks, GQA ratios, blocks, tiles and cache dtypes."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimllm.reference import kv_cache, positions
from slimllm.reference.attention import (
    attention_bias,
    group_bias,
    group_queries,
    naive_attention,
    ungroup,
)
from slimllm.reference.config import ModelConfig
from slimllm.reference.flash_attention import flash_attention
from slimllm.reference.key_blocks import exact_rows
from slimllm.reference.slim_attention import block_rows, slim_attention

CFG = ModelConfig(
    vocab=16, width=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=8, max_len=64
)


def layer_kv(k, v):
    return kv_cache.LayerKV(k, v, None, None, kv_cache.KV_FORMATS["float32"])


def loop_attention(q, k, v, allowed, scale, slopes=None, qslots=None):
    """One (row, head, query) at a time, with a Python softmax: the definition spelled out."""
    b, t, h, d = q.shape
    g = h // k.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for r in range(b):
        for head in range(h):
            for i in range(t):
                keys = [j for j in range(k.shape[2]) if allowed[r, i, j]]
                s = np.array([q[r, i, head] @ k[r, head // g, j] * scale for j in keys], np.float64)
                if slopes is not None:
                    s += np.array([slopes[head] * (j - qslots[r, i]) for j in keys])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[r, i, head] = sum(pj * v[r, head // g, j] for pj, j in zip(p, keys))
    return out


def draw(b=2, t=3, s=7, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, 4, 8)).astype(np.float32)
    k = rng.standard_normal((b, 2, s, 8)).astype(np.float32)
    v = rng.standard_normal((b, 2, s, 8)).astype(np.float32)
    return q, k, v


def state(lengths, prefix=None):
    n = len(lengths)
    prefix = np.zeros(n, int) if prefix is None else np.asarray(prefix)
    return positions.SeqState(np.asarray(lengths), prefix, np.zeros(n, int), np.ones(n, np.float32))


def test_causal_gqa_with_past():
    q, k, v = draw()
    pos = positions.positions_for(CFG, state([2, 4]), 3)
    got = naive_attention(q, layer_kv(k, v), attention_bias(CFG, pos, 7), 8**-0.5)
    allowed = np.arange(7)[None, None] <= pos.slots[:, :, None]
    np.testing.assert_allclose(got, loop_attention(q, k, v, allowed, 8**-0.5), rtol=1e-5, atol=1e-6)


def test_prefix_lm_lets_the_prefix_see_ahead():
    q, k, v = draw(b=1, t=5, s=5)
    pos = positions.positions_for(CFG, state([0], [3]), 5)
    got = naive_attention(q, layer_kv(k, v), attention_bias(CFG, pos, 5), 8**-0.5)
    j, i = np.arange(5)[None, None], np.arange(5)[None, :, None]
    allowed = (j <= i) | (j < 3)
    np.testing.assert_allclose(got, loop_attention(q, k, v, allowed, 8**-0.5), rtol=1e-5, atol=1e-6)


def test_alibi_bias():
    cfg = CFG.replace(pos="alibi")
    q, k, v = draw(b=1, t=4, s=6, seed=3)
    pos = positions.positions_for(cfg, state([2]), 4)
    got = naive_attention(q, layer_kv(k, v), attention_bias(cfg, pos, 6), 8**-0.5)
    allowed = np.arange(6)[None, None] <= pos.slots[:, :, None]
    want = loop_attention(q, k, v, allowed, 8**-0.5, positions.alibi_slopes(4), pos.slots)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_block_rows_rule():
    """xFT's rule: d=128, T=1024 -> mb=205; T>=2048 -> one block; small T -> one block."""
    assert block_rows(1024, 128) == 205
    assert block_rows(2048, 128) == 2048 and block_rows(4096, 128) == 4096
    assert block_rows(16, 128) == 16
    assert block_rows(1024, 128, budget=2 * 1024 * 128) == 1024


@st.composite
def attention_case(draw, kv_dtype=None):
    """A cache with P past tokens, T new queries and spare slots, any mask and cache dtype."""
    b = draw(st.sampled_from([1, 2]))
    t = draw(st.sampled_from([1, 2, 3, 5, 9, 17]))
    past = draw(st.sampled_from([0, 1, 4, 11]))
    kh = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([4, 8]))
    mask = draw(st.sampled_from(["causal", "prefix", "alibi"]))
    dtype = kv_dtype or draw(st.sampled_from(kv_cache.KV_DTYPES))
    spare = draw(st.sampled_from([0, 3]))
    seed = draw(st.integers(0, 2**16))
    cfg = CFG.replace(
        n_heads=kh * g,
        n_kv_heads=kh,
        head_dim=d,
        width=kh * g * d,
        pos="alibi" if mask == "alibi" else "rope",
    )
    s = past + t + spare
    rng = np.random.default_rng(seed)
    cache = kv_cache.init_cache(cfg, b, s, dtype)
    k = rng.standard_normal((b, past + t, kh, d)).astype(np.float32) * 2
    v = rng.standard_normal((b, past + t, kh, d)).astype(np.float32)
    slots = np.broadcast_to(np.arange(past + t), (b, past + t))
    cache = kv_cache.write(cache, 0, k, v, slots)
    prefix = rng.integers(0, past + t + 1, b) if mask == "prefix" else None
    pos = positions.positions_for(cfg, state([past] * b, prefix), t)
    q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32) * 2
    return q, kv_cache.read(cache, 0), attention_bias(cfg, pos, s), d**-0.5


def close(got, want, rtol=1e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@given(attention_case(), st.sampled_from([None, 1, 2, 3, 7]), st.sampled_from([1, 2, 3]))
def test_slim_equals_naive(case, mb, key_splits):
    q, kv, bias, scale = case
    close(
        slim_attention(q, kv, bias, scale, mb=mb, key_splits=key_splits, key_block=5),
        naive_attention(q, kv, bias, scale),
    )


@given(attention_case(), st.sampled_from([1, 2, 4, 64]), st.sampled_from([1, 3, 8, 64]))
def test_flash_equals_naive(case, q_tile, k_tile):
    q, kv, bias, scale = case
    close(
        flash_attention(q, kv, bias, scale, q_tile=q_tile, k_tile=k_tile),
        naive_attention(q, kv, bias, scale),
    )


@pytest.mark.parametrize("kv_dtype", kv_cache.KV_DTYPES)
@given(data=st.data(), key_block=st.sampled_from([1, 3, 4, 256]))
def test_key_blocked_form_equals_the_definition(kv_dtype, data, key_block):
    """Every cache dtype: K and V widened one key block at a time, int8 scales on score columns
    and folded into the probabilities (exact_rows) == softmax(q kᵀ · scale + bias) · v over the
    dequantised cache."""
    q, kv, bias, scale = data.draw(attention_case(kv_dtype))
    kh = kv.k.shape[1]
    qg, gbias = group_queries(q, kh), group_bias(bias, kh)
    blocked = exact_rows(qg, kv, gbias, scale, kv.length, key_block)  # [b,k,g,t,d]
    close(ungroup(blocked), naive_attention(q, kv, bias, scale))
