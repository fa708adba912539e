"""The whole decoder in JAX: the reference's `model.py` with `jnp` for `np`.

`forward` is a pure function of arrays (jit it with `cfg` and `rt` static and the cache
donated; `generate.py` does). Layers are a Python loop: the per-layer cache is a tuple, and an
unrolled loop keeps this file a line-by-line mirror of the reference. Bounds (token ids, cache
length, learned-position table) are checked on the host before calling, since a traced
function cannot raise on values.

The one addition over the reference is tensor parallelism (see `tp.py`): given a `Comm` of
several ranks, `forward` runs on this rank's heads and ffn columns (shapes come from the
weights), and the two row-parallel projections of each block (attention output, MLP down) end in
`row_parallel`, the only place partial sums are reduced; their biases are added once, after.

Tracing is the reference's observer with its own switch. Under jit, `observe` runs while the
function is traced: a program traced inside `tracing()` returns the dict it fills (see
`generate.trace_fn`), and every program traced outside it is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from slimllm import kernels
from slimllm.reference.config import ModelConfig
from slimllm.reference.model import observe
from slimllm.reference.params import Params

from . import kv_cache
from .attention import attention_bias
from .ops import MLPS, NORMS, bias_add, linear, rms_norm
from .params import DeviceLayer
from .positions import (
    ROTATIONS,
    Positions,
    SeqState,
    learned_positions,
    logn_scale,
    positions_for,
    rope_tables,
)
from .runtime import Runtime, attention_fn
from .tp import SINGLE, Comm
from .weight_format import take_rows

DEFAULT = Runtime()


def norm(x, w, bias, cfg: ModelConfig):
    return NORMS[cfg.norm](x, w, bias, cfg.norm_eps)


# Tracing is the reference's observer itself (`observe` above records only inside
# `reference.model.tracing()`): under jit it records while the program is traced, so open
# `tracing()` inside the jitted function (`sequence.trace_fn`) and return the dict.


# ---------------------------------------------------------------- the decoder


def row_parallel(y, bias, comm: Comm):
    """Finish a row-parallel projection: sum the ranks' partial results, then add the bias once
    (collective #1 after the attention output, #2 after the MLP down projection)."""
    y = comm.sum(y)
    return y if bias is None else y + bias


def qkv(x, p: DeviceLayer, cfg: ModelConfig, pos: Positions, kv_heads: int | None = None):
    """Projections with biases, per-head q/k norm, then positions: [b,t,e] -> q [b,t,h,d], k/v.
    A tensor-parallel rank holds `kv_heads` kv heads (its cache's; default the model's) and the
    query heads of the rest of its slice of w_qkv."""
    b, t, _ = x.shape
    d = cfg.head_dim
    y = linear(x, p.w_qkv)  # [b,t,e] -> [b,t,(h+2k)d], one fused product (params.py)
    kd = (cfg.n_kv_heads if kv_heads is None else kv_heads) * d  # this rank's k*d
    q, k, v = jnp.split(y, [y.shape[-1] - 2 * kd, y.shape[-1] - kd], axis=-1)
    q = bias_add(q, p.bq).reshape(b, t, -1, d)  # [b,t,h*d] -> [b,t,h,d]
    k = bias_add(k, p.bk).reshape(b, t, -1, d)  # [b,t,k*d] -> [b,t,k,d]
    v = bias_add(v, p.bv).reshape(b, t, -1, d)  # [b,t,k*d] -> [b,t,k,d]
    if cfg.qk_norm:
        q = rms_norm(q, p.q_norm, None, cfg.norm_eps)
        k = rms_norm(k, p.k_norm, None, cfg.norm_eps)
    rotate = ROTATIONS[cfg.pos]
    q, k = rotate(q, cfg, pos), rotate(k, cfg, pos)
    if cfg.logn_len:
        q = q * logn_scale(cfg, pos)[:, :, None, None]  # [b,t,h,d] * [b,t,1,1]
    return q, k, v


def attention_block(
    x,
    p: DeviceLayer,
    cfg: ModelConfig,
    cache,
    layer: int,
    pos: Positions,
    bias,
    rt: Runtime = DEFAULT,
    comm: Comm = SINGLE,
):
    """Self-attention sublayer: writes this layer's K/V, then reads the cache back."""
    b, t, _ = x.shape
    observe(f"layers.{layer}.attn_in", x)
    q, k, v = qkv(x, p, cfg, pos, kv_heads=cache.k[layer].shape[1])
    for name, y in (("q", q), ("k", k), ("v", v)):
        observe(f"layers.{layer}.{name}", y)
    cache = kv_cache.write(cache, layer, k, v, pos.slots)
    kv = kv_cache.read(cache, layer, rows=b)  # [b,k,s,d] as stored (of B >= b cache rows)
    o = attention_fn(rt)(q, kv, bias, cfg.head_dim**-0.5)  # [b,t,h,d]
    out = row_parallel(linear(o.reshape(b, t, -1), p.wo), p.bo, comm)  # -> [b,t,h*d] -> [b,t,e]
    return observe(f"layers.{layer}.attn_out", out), cache


def mlp_block(x, p: DeviceLayer, cfg: ModelConfig, comm: Comm = SINGLE):
    """The MLP sublayer: [b,t,e] -> [b,t,e] (down-projection bias added after the reduce)."""
    return row_parallel(MLPS[cfg.mlp](x, dataclasses.replace(p, b_down=None)), p.b_down, comm)


def block(
    x,
    p: DeviceLayer,
    cfg: ModelConfig,
    cache,
    layer: int,
    pos: Positions,
    bias,
    rt: Runtime = DEFAULT,
    comm: Comm = SINGLE,
):
    """One transformer block in the config's residual layout."""

    def mlp(y):
        observe(f"layers.{layer}.mlp_in", y)
        return observe(f"layers.{layer}.mlp_out", mlp_block(y, p, cfg, comm))

    attend = functools.partial(
        attention_block,
        p=p,
        cfg=cfg,
        layer=layer,
        pos=pos,
        bias=bias,
        rt=rt,
        comm=comm,
    )
    if cfg.residual == "pre_norm":
        y, cache = attend(norm(x, p.attn_norm, p.attn_norm_b, cfg), cache=cache)
        mid = x + y
        out = mid + mlp(norm(mid, p.mlp_norm, p.mlp_norm_b, cfg))
    elif cfg.residual == "post_norm":
        y, cache = attend(x, cache=cache)
        mid = norm(x + y, p.attn_norm, p.attn_norm_b, cfg)
        out = norm(mid + mlp(mid), p.mlp_norm, p.mlp_norm_b, cfg)
    else:  # normed_input
        n = norm(x, p.attn_norm, p.attn_norm_b, cfg)
        y, cache = attend(n, cache=cache)
        mid = jnp.float32(cfg.residual_alpha) * n + y
        m = norm(mid, p.mlp_norm, p.mlp_norm_b, cfg)
        out = jnp.float32(cfg.residual_alpha) * m + mlp(m)
    return observe(f"layers.{layer}.out", out), cache


def embed(params: Params, cfg: ModelConfig, tokens, pos: Positions):
    """Token (and learned position) embeddings: [b,t] -> [b,t,e]."""
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
    # tied: the embedding table; under tensor parallelism the head is always its own (split) copy
    head = params.embed if params.lm_head is None else params.lm_head  # [v,e'] (device layout)
    return linear(x, head).astype(jnp.float32)  # [b,t,e'] -> [b,t,v]


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens,
    cache,
    state: SeqState,
    rt: Runtime = DEFAULT,
    select=None,
    comm: Comm = SINGLE,
):
    """tokens [b,t], written after each row's `state.lengths` tokens -> (logits [b,t,v] or
    [b,1,v] with `select`, cache). With a multi-rank `comm`, logits are this rank's vocabulary
    slice [b,t,v/R]."""
    with kernels.choose(rt.kernels):  # while tracing: compiled kernels or pure XLA
        return decoder(params, cfg, tokens, cache, state, rt, select, comm)


def decoder(params, cfg, tokens, cache, state, rt, select, comm):
    """`forward`'s body (traced under its choice of kernels)."""
    pos = positions_for(cfg, state, tokens.shape[1])  # where these t tokens go
    x = observe("embed", embed(params, cfg, tokens, pos))  # [b,t] -> [b,t,e]
    bias = comm.local_heads(attention_bias(cfg, pos, cache.max_len))  # [b,h|1,t,s]
    with rope_tables(cache.max_len):  # no position id reaches the cache's length
        for i, layer in enumerate(params.layers):
            x, cache = block(x, layer, cfg, cache, i, pos, bias, rt, comm)
    if select is not None:
        x = x[jnp.arange(x.shape[0]), select][:, None]  # [b,t,e] -> [b,1,e]
    return observe("logits", unembed(params, cfg, x)), cache
