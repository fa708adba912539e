"""Elementwise and normalisation operations: norms, activations, MLPs, softmax.

Each function is the textbook formula in float32 NumPy. The JAX backend's `ops.py` has the same
functions with `jnp` for `np`. Dispatch tables (`NORMS`, `MLPS`) are the one place a config axis
is looked up (STYLE.md rule 4).
"""

from __future__ import annotations

import numpy as np

from .weight_format import widen


def rms_norm(x, w, bias, eps):
    """x / sqrt(mean(x^2) + eps) * w, over the last axis (no bias: RMSNorm has none)."""
    x32 = x.astype(np.float32)
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(eps))  # [...,1]
    return x32 * inv * w


def layer_norm(x, w, bias, eps):
    """(x - mean) / sqrt(var + eps) * w + bias, over the last axis (biased variance)."""
    x32 = x.astype(np.float32)
    mu = np.mean(x32, axis=-1, keepdims=True)  # [...,e] -> [...,1]
    var = np.mean((x32 - mu) ** 2, axis=-1, keepdims=True)  # [...,e] -> [...,1]
    return (x32 - mu) / np.sqrt(var + np.float32(eps)) * w + bias


NORMS = {"rms": rms_norm, "layer": layer_norm}


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    """GeLU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def relu(x):
    return np.maximum(x, np.float32(0.0))


def linear(x, w, bias=None):
    """x @ w (+ bias); w is [in, out] in any weight format, widened to float32 for the product."""
    y = x @ widen(w)  # [...,in] -> [...,out]
    return y if bias is None else y + bias


def swiglu_mlp(x, p):
    """down(silu(x @ gate) * (x @ up)), the Llama / Qwen / Baichuan / ChatGLM2 MLP."""
    gate = linear(x, p.w_gate)  # [b,t,e] -> [b,t,f]
    up = linear(x, p.w_up, p.b_up)  # [b,t,e] -> [b,t,f]
    return linear(silu(gate) * up, p.w_down, p.b_down)  # [b,t,f] -> [b,t,e]


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
    m = np.max(x, axis=axis, keepdims=True)  # [..., n] -> [..., 1], n: the softmax axis
    m = np.where(np.isfinite(m), m, np.float32(0.0))
    w = np.exp(x - m)  # unnormalised weights [..., n]
    total = np.sum(w, axis=axis, keepdims=True)  # [..., n] -> [..., 1]
    return w / np.where(total > 0, total, np.float32(1.0))


def log_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)  # [..., n] -> [..., 1]
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))
