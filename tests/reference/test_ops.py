import numpy as np
import pytest

from slimllm.reference import ops


def test_rms_norm_matches_formula():
    x = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
    w = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-6) * w
    np.testing.assert_allclose(ops.rms_norm(x, w, None, 1e-6), want, rtol=1e-6)


def test_layer_norm_has_zero_mean_unit_variance_before_affine():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16)).astype(np.float32) * 5 + 2
    y = ops.layer_norm(x, np.ones(16, np.float32), np.zeros(16, np.float32), 1e-5)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-3)
    b = np.arange(16, dtype=np.float32)
    np.testing.assert_allclose(
        ops.layer_norm(x, 2 * np.ones(16, np.float32), b, 1e-5), 2 * y + b, rtol=1e-5, atol=1e-5
    )


def test_activations():
    x = np.array([-3.0, -0.5, 0.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(ops.silu(x), x / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(ops.relu(x), [0, 0, 0, 0.5, 3.0])
    # GeLU tanh at 1.0: 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715)) = 0.841192
    assert ops.gelu_tanh(np.float32(1.0)) == pytest.approx(0.8411920, abs=1e-6)


def test_softmax_rows_and_masked_rows():
    x = np.array([[0.0, np.log(3.0)], [-np.inf, -np.inf]], np.float32)
    np.testing.assert_allclose(ops.softmax(x), [[0.25, 0.75], [0.0, 0.0]], rtol=1e-6)


class P:
    pass


def test_mlps():
    rng = np.random.default_rng(1)
    p = P()
    p.w_gate, p.w_up, p.w_down = (
        rng.standard_normal(s).astype(np.float32) for s in [(4, 6), (4, 6), (6, 4)]
    )
    p.b_up, p.b_down = (
        rng.standard_normal(6).astype(np.float32),
        rng.standard_normal(4).astype(np.float32),
    )
    x = rng.standard_normal((2, 4)).astype(np.float32)
    h = x @ p.w_up + p.b_up
    np.testing.assert_allclose(
        ops.relu_mlp(x, p), np.maximum(h, 0) @ p.w_down + p.b_down, rtol=1e-5
    )
    np.testing.assert_allclose(
        ops.gelu_mlp(x, p), ops.gelu_tanh(h) @ p.w_down + p.b_down, rtol=1e-5
    )
    g = x @ p.w_gate
    np.testing.assert_allclose(
        ops.swiglu_mlp(x, p), (ops.silu(g) * h) @ p.w_down + p.b_down, rtol=1e-5
    )
