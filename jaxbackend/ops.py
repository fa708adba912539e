"""Norms, activations, MLPs and softmax: the reference's `ops.py` with `jnp` for `np`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax


def rms_norm(x, w, b, eps):
    """x / sqrt(mean(x^2) + eps) * w, over the last axis (b is unused: RMSNorm has no bias)."""
    x32 = x.astype(jnp.float32)
    inv = 1.0 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(eps))
    return x32 * inv * w


def layer_norm(x, w, b, eps):
    """(x - mean) / sqrt(var + eps) * w + b, over the last axis (biased variance)."""
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean((x32 - mu) ** 2, axis=-1, keepdims=True)
    return (x32 - mu) / jnp.sqrt(var + jnp.float32(eps)) * w + b


NORMS = {"rms": rms_norm, "layer": layer_norm}


def silu(x):
    return x / (1.0 + jnp.exp(-x))


def gelu_tanh(x):
    """GeLU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = jnp.float32(np.sqrt(2.0 / np.pi))
    return jnp.float32(0.5) * x * (1.0 + jnp.tanh(c * (x + jnp.float32(0.044715) * x * x * x)))


def relu(x):
    return jnp.maximum(x, jnp.float32(0.0))


def bias_add(y, b=None):
    return y if b is None else y + b


def linear(x, w, b=None):
    """x @ w.T (+ b); w is [out, in] (the device layout, see `params.py`)."""
    return bias_add(lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ()))), b)


def swiglu_mlp(x, p):
    """down(silu(x @ gate) * (x @ up)), gate and up as one fused product (`params.py`)."""
    gate, up = jnp.split(linear(x, p.w_gate_up), 2, axis=-1)  # [b,t,e] -> 2 x [b,t,f]
    return linear(silu(gate) * bias_add(up, p.b_up), p.w_down, p.b_down)  # [b,t,f] -> [b,t,e]


def gelu_mlp(x, p):
    return linear(gelu_tanh(linear(x, p.w_up, p.b_up)), p.w_down, p.b_down)


def relu_mlp(x, p):
    return linear(relu(linear(x, p.w_up, p.b_up)), p.w_down, p.b_down)


MLPS = {"swiglu": swiglu_mlp, "gelu": gelu_mlp, "relu": relu_mlp}


def softmax(x, axis=-1):
    """exp(x - max) / sum; rows that are all -inf give zeros rather than NaN."""
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, jnp.float32(0.0))
    e = jnp.exp(x - m)
    s = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(s > 0, s, jnp.float32(1.0))


def log_softmax(x, axis=-1):
    m = jnp.max(x, axis=axis, keepdims=True)
    z = x - m
    return z - jnp.log(jnp.sum(jnp.exp(z), axis=axis, keepdims=True))
