"""The whole decoder: one `forward` for prefill and decode.

`forward(params, cfg, tokens, cache, state)` places the tokens after each row's cached ones
(`positions.SeqState`), embeds them, runs every block (attention writes
the new K/V into the cache, then reads the cache back), applies the final norm and the LM head,
and returns logits for every input position plus the new cache. Prefill is a call with t > 1 on
an empty cache, decode a call with t = 1; there is no other path. The three residual layouts
(mid: the residual stream between the two sublayers, alpha: `residual_alpha`):
  pre_norm      mid = x + attn(norm(x));  out = mid + mlp(norm(mid))       (Llama, Qwen, OPT, ...)
  post_norm     mid = norm(x + attn(x));  out = norm(mid + mlp(mid))       (OPT-350m)
  normed_input  n = norm(x); mid = alpha*n + attn(n); m = norm(mid); out = alpha*m + mlp(m)
                (GLM-6B)
Named intermediates (TRACE_KEYS) are handed to `observe` as they are computed; it returns them
unchanged and keeps them only inside `with tracing() as trace:` (what `slimllm diff` compares).
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np

from . import kv_cache
from .attention import attention_bias
from .config import ModelConfig
from .errors import OptionError
from .ops import MLPS, NORMS, linear, rms_norm
from .params import LayerParams, Params
from .positions import (
    ROTATIONS,
    Positions,
    SeqState,
    learned_positions,
    logn_scale,
    positions_for,
)
from .runtime import Runtime, attention_fn
from .weight_format import take_rows, widen

DEFAULT = Runtime(backend="numpy")


def norm(x, w, bias, cfg: ModelConfig):
    return NORMS[cfg.norm](x, w, bias, cfg.norm_eps)


# ---------------------------------------------------------------- tracing (an optional observer)

# The dict the forwards inside `tracing()` fill; None (no effect) everywhere else.
TRACE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("trace", default=None)


@contextlib.contextmanager
def tracing():
    """Keep the named intermediates of every forward run inside the block:
    `with tracing() as trace: forward(...)` leaves name -> array in `trace` (TRACE_KEYS)."""
    trace = {}
    token = TRACE.set(trace)
    try:
        yield trace
    finally:
        TRACE.reset(token)


def observe(name: str, x):
    """x, unchanged; inside `tracing()` it is also kept under `name`."""
    trace = TRACE.get()
    if trace is not None:
        trace[name] = x
    return x


# Intermediates a traced forward observes, in computation order ({i}: layer index). The names
# are the public keys of `slimllm diff` and of user dumps.
TRACE_KEYS = (
    "embed",  # token (+ position) embeddings [b,t,e]
    "layers.{i}.attn_in",  # input of the attention sublayer (normed, except post-norm) [b,t,e]
    "layers.{i}.q",  # queries after q/k norm, positions and logN scaling [b,t,h,d]
    "layers.{i}.k",  # keys after q/k norm and positions, before the cache [b,t,k,d]
    "layers.{i}.v",  # values [b,t,k,d]
    "layers.{i}.attn_out",  # attention sublayer output, after the output projection [b,t,e]
    "layers.{i}.mlp_in",  # input of the MLP sublayer [b,t,e]
    "layers.{i}.mlp_out",  # MLP sublayer output [b,t,e]
    "layers.{i}.out",  # block output (the residual stream) [b,t,e]
    "final_norm",  # after the final norm (absent without one) [b,t,e]
    "logits",  # [b,t,v]
)


# ---------------------------------------------------------------- the decoder


def qkv(x, p: LayerParams, cfg: ModelConfig, pos: Positions):
    """Projections with biases, per-head q/k norm, then positions: [b,t,e] -> q [b,t,h,d], k/v."""
    b, t, _ = x.shape
    d = cfg.head_dim
    q = linear(x, p.wq, p.bq).reshape(b, t, cfg.n_heads, d)  # [b,t,e] -> [b,t,h,d]
    k = linear(x, p.wk, p.bk).reshape(b, t, cfg.n_kv_heads, d)  # [b,t,e] -> [b,t,k,d]
    v = linear(x, p.wv, p.bv).reshape(b, t, cfg.n_kv_heads, d)  # [b,t,e] -> [b,t,k,d]
    if cfg.qk_norm:
        q = rms_norm(q, p.q_norm, None, cfg.norm_eps)
        k = rms_norm(k, p.k_norm, None, cfg.norm_eps)
    rotate = ROTATIONS[cfg.pos]
    q, k = rotate(q, cfg, pos), rotate(k, cfg, pos)
    if cfg.logn_len:
        q = q * logn_scale(cfg, pos)[:, :, None, None]  # [b,t,h,d] * [b,t,1,1]
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def attention_block(
    x,
    p: LayerParams,
    cfg: ModelConfig,
    cache,
    layer: int,
    pos: Positions,
    bias,
    rt: Runtime = DEFAULT,
):
    """Self-attention sublayer: [b,t,e] -> [b,t,e], writing this layer's K/V into the cache
    and then reading the cache back (so prefill equals decode steps for every cache dtype)."""
    b, t, _ = x.shape
    observe(f"layers.{layer}.attn_in", x)
    q, k, v = qkv(x, p, cfg, pos)
    for name, y in (("q", q), ("k", k), ("v", v)):
        observe(f"layers.{layer}.{name}", y)
    cache = kv_cache.write(cache, layer, k, v, pos.slots)
    kv = kv_cache.read(cache, layer)  # [b,k,s,d] as stored
    o = attention_fn(rt)(q, kv, bias, cfg.head_dim**-0.5)  # [b,t,h,d]
    out = linear(o.reshape(b, t, cfg.n_heads * cfg.head_dim), p.wo, p.bo)  # -> [b,t,h*d] -> [b,t,e]
    return observe(f"layers.{layer}.attn_out", out), cache


def block(
    x,
    p: LayerParams,
    cfg: ModelConfig,
    cache,
    layer: int,
    pos: Positions,
    bias,
    rt: Runtime = DEFAULT,
):
    """One transformer block in the config's residual layout."""

    def mlp(y):
        observe(f"layers.{layer}.mlp_in", y)
        return observe(f"layers.{layer}.mlp_out", MLPS[cfg.mlp](y, p))

    def attend(y, cache):
        return attention_block(y, p, cfg, cache, layer, pos, bias, rt)

    if cfg.residual == "pre_norm":
        y, cache = attend(norm(x, p.attn_norm, p.attn_norm_b, cfg), cache)
        mid = x + y
        out = mid + mlp(norm(mid, p.mlp_norm, p.mlp_norm_b, cfg))
    elif cfg.residual == "post_norm":
        y, cache = attend(x, cache)
        mid = norm(x + y, p.attn_norm, p.attn_norm_b, cfg)
        out = norm(mid + mlp(mid), p.mlp_norm, p.mlp_norm_b, cfg)
    else:  # normed_input
        n = norm(x, p.attn_norm, p.attn_norm_b, cfg)
        y, cache = attend(n, cache)
        mid = np.float32(cfg.residual_alpha) * n + y
        m = norm(mid, p.mlp_norm, p.mlp_norm_b, cfg)
        out = np.float32(cfg.residual_alpha) * m + mlp(m)
    return observe(f"layers.{layer}.out", out), cache


def embed(params: Params, cfg: ModelConfig, tokens, pos: Positions):
    """Token (and learned position) embeddings: [b,t] -> [b,t,e]."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab):
        raise OptionError(f"token id out of range [0, {cfg.vocab}): {tokens.min()}..{tokens.max()}")
    x = take_rows(params.embed, tokens)  # [b,t] -> [b,t,e'] (float32)
    if params.proj_in is not None:
        x = linear(x, params.proj_in)  # [b,t,e'] -> [b,t,e]
    if cfg.pos == "learned":
        x = x + learned_positions(params.pos_embed, cfg, pos)  # [b,t,e]
    return x


def unembed(params: Params, cfg: ModelConfig, x):
    """Final norm, output projection and LM head: [b,t,e] -> logits [b,t,v]."""
    if cfg.final_norm:
        x = observe("final_norm", norm(x, params.final_norm, params.final_norm_b, cfg))
    if params.proj_out is not None:
        x = linear(x, params.proj_out)  # [b,t,e] -> [b,t,e']
    head = widen(params.embed).T if cfg.tied_head else params.lm_head  # [e',v]
    return linear(x, head).astype(np.float32)  # [b,t,e'] -> [b,t,v]


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens,
    cache,
    state: SeqState,
    rt: Runtime = DEFAULT,
    select=None,
):
    """tokens [b,t], written after each row's `state.lengths` tokens -> (logits [b,t,v], new
    cache); with `select` [b], only the logits at position select[r] of each row ([b,1,v]: a
    prefill needs just the last)."""
    tokens = np.asarray(tokens)
    pos = positions_for(cfg, state, tokens.shape[1])  # where these t tokens go
    kv_cache.check_fits(cache, pos.slots)
    x = observe("embed", embed(params, cfg, tokens, pos))  # [b,t] -> [b,t,e]
    bias = attention_bias(cfg, pos, cache.max_len)  # [b,h|1,t,s]
    for i, layer in enumerate(params.layers):
        x, cache = block(x, layer, cfg, cache, i, pos, bias, rt)
    if select is not None:
        x = x[np.arange(x.shape[0]), np.asarray(select)][:, None]  # [b,t,e] -> [b,1,e]
    return observe("logits", unembed(params, cfg, x)), cache
