import numpy as np

from slimllm.reference import positions
from slimllm.reference.attention import attention_bias, naive_attention
from slimllm.reference.config import ModelConfig

CFG = ModelConfig(vocab=16, width=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                  ffn_width=8, max_len=64)


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


def test_causal_gqa_with_past():
    q, k, v = draw()
    state = positions.SeqState(np.array([2, 4]), np.zeros(2, int), np.zeros(2, int), np.ones(2, np.float32))
    pos = positions.positions_for(CFG, state, 3)
    got = naive_attention(q, k, v, attention_bias(CFG, pos, 7), 8**-0.5)
    allowed = np.arange(7)[None, None] <= pos.slots[:, :, None]
    np.testing.assert_allclose(got, loop_attention(q, k, v, allowed, 8**-0.5), rtol=1e-5, atol=1e-6)


def test_prefix_lm_lets_the_prefix_see_ahead():
    q, k, v = draw(b=1, t=5, s=5)
    state = positions.SeqState(np.array([0]), np.array([3]), np.array([0]), np.ones(1, np.float32))
    pos = positions.positions_for(CFG, state, 5)
    got = naive_attention(q, k, v, attention_bias(CFG, pos, 5), 8**-0.5)
    j, i = np.arange(5)[None, None], np.arange(5)[None, :, None]
    allowed = (j <= i) | (j < 3)
    np.testing.assert_allclose(got, loop_attention(q, k, v, allowed, 8**-0.5), rtol=1e-5, atol=1e-6)


def test_alibi_bias():
    cfg = CFG.replace(pos="alibi")
    q, k, v = draw(b=1, t=4, s=6, seed=3)
    pos = positions.simple_positions(cfg, 1, 4, start=2)
    got = naive_attention(q, k, v, attention_bias(cfg, pos, 6), 8**-0.5)
    allowed = np.arange(6)[None, None] <= pos.slots[:, :, None]
    want = loop_attention(q, k, v, allowed, 8**-0.5, positions.alibi_slopes(4), pos.slots)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
