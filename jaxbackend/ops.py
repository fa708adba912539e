"""Norms, activations, MLPs and softmax: the reference's `ops.py` with `jnp` for `np`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from slimllm.kernels import linear as kernel
from slimllm.reference.weight_format import Compact

from .weight_format import compact_linear


def rms_norm(x, w, bias, eps):
    """x / sqrt(mean(x^2) + eps) * w, over the last axis (no bias: RMSNorm has none)."""
    x32 = x.astype(jnp.float32)
    inv = 1.0 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(eps))  # [...,1]
    return x32 * inv * w


def layer_norm(x, w, bias, eps):
    """(x - mean) / sqrt(var + eps) * w + bias, over the last axis (biased variance)."""
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)  # [...,e] -> [...,1]
    var = jnp.mean((x32 - mu) ** 2, axis=-1, keepdims=True)  # [...,e] -> [...,1]
    return (x32 - mu) / jnp.sqrt(var + jnp.float32(eps)) * w + bias


NORMS = {"rms": rms_norm, "layer": layer_norm}


def silu(x):
    return x / (1.0 + jnp.exp(-x))


def gelu_tanh(x):
    """GeLU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = jnp.float32(np.sqrt(2.0 / np.pi))
    return jnp.float32(0.5) * x * (1.0 + jnp.tanh(c * (x + jnp.float32(0.044715) * x * x * x)))


def relu(x):
    return jnp.maximum(x, jnp.float32(0.0))


def bias_add(y, bias=None):
    return y if bias is None else y + bias


def linear(x, w, bias=None):
    """x @ w.T (+ bias); w is [out, in] (the device layout, see `params.py`) in any weight
    format. The few rows of decoding go to the compiled kernel where it is active
    (`slimllm.kernels.linear`); otherwise XLA multiplies, and a compact weight is widened tile by
    tile inside the product (`weight_format.py`)."""
    y = kernel.linear(x, w)
    if y is not None:
        return bias_add(y, bias)
    if isinstance(w, Compact):
        return bias_add(compact_linear(x, w), bias)
    y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))  # [...,in] -> [...,out]
    return bias_add(y, bias)


def swiglu_mlp(x, p):
    """down(silu(x @ gate) * (x @ up)), gate and up as one fused product (`params.py`)."""
    gate, up = jnp.split(linear(x, p.w_gate_up), 2, axis=-1)  # [b,t,e] -> 2 x [b,t,f]
    return linear(silu(gate) * bias_add(up, p.b_up), p.w_down, p.b_down)  # [b,t,f] -> [b,t,e]


def gelu_mlp(x, p):
    """down(gelu_tanh(x @ up + b_up)) + b_down."""
    up = linear(x, p.w_up, p.b_up)  # [b,t,e] -> [b,t,f]
    return linear(gelu_tanh(up), p.w_down, p.b_down)  # [b,t,f] -> [b,t,e]


def relu_mlp(x, p):
    """down(relu(x @ up + b_up)) + b_down."""
    up = linear(x, p.w_up, p.b_up)  # [b,t,e] -> [b,t,f]
    return linear(relu(up), p.w_down, p.b_down)  # [b,t,f] -> [b,t,e]


MLPS = {"swiglu": swiglu_mlp, "gelu": gelu_mlp, "relu": relu_mlp}


def softmax(x, axis=-1):
    """exp(x - max) / sum; rows that are all -inf give zeros rather than NaN."""
    m = jnp.max(x, axis=axis, keepdims=True)  # [..., n] -> [..., 1], n: the softmax axis
    m = jnp.where(jnp.isfinite(m), m, jnp.float32(0.0))
    w = jnp.exp(x - m)  # unnormalised weights [..., n]
    total = jnp.sum(w, axis=axis, keepdims=True)  # [..., n] -> [..., 1]
    return w / jnp.where(total > 0, total, jnp.float32(1.0))


def log_softmax(x, axis=-1):
    m = jnp.max(x, axis=axis, keepdims=True)  # [..., n] -> [..., 1]
    z = x - m
    return z - jnp.log(jnp.sum(jnp.exp(z), axis=axis, keepdims=True))
