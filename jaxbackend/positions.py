"""Positions and position encodings: the reference's `positions.py` in jnp.

`Positions` and `SeqState` are the reference's classes, registered as pytrees. Reading facts off
a prompt (`start_state`) happens on the host, before jit, with the reference's function; every
per-token computation below runs inside jit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from slimllm.reference import positions as ref_positions
from slimllm.reference.config import DynamicNTK, ModelConfig, WavelengthScaling
from slimllm.reference.positions import Positions, SeqState, alibi_slopes, start_state

from .params import register
from .weight_format import take_rows

register(Positions)
register(SeqState)

__all__ = [
    "Positions",
    "SeqState",
    "alibi_slopes",
    "start_state",
    "positions_for",
    "advance",
    "rope_tables",
]


def positions_for(cfg: ModelConfig, state: SeqState, t: int) -> Positions:
    """Positions of the next t tokens of every row (slots continue from state.lengths)."""
    slots = state.lengths[:, None] + jnp.arange(t)[None, :]  # [b,t]
    if cfg.pos == "rope2d":
        ctx = state.prefix[:, None]
        in_block = slots >= ctx
        pos = jnp.where(in_block, state.anchor[:, None], slots)
        block = jnp.where(in_block, slots - ctx + 1, 0)
        ids = jnp.stack([pos, block], axis=-1)  # [b,t,2]
    else:
        ids = slots
    return Positions(slots, ids, state.prefix, state.ntk_alpha)


def advance(state: SeqState, n) -> SeqState:
    return dataclasses.replace(state, lengths=state.lengths + n)


def device_state(state: SeqState) -> SeqState:
    """A host SeqState as int32/float32 device arrays."""
    return SeqState(
        jnp.asarray(state.lengths, jnp.int32),
        jnp.asarray(state.prefix, jnp.int32),
        jnp.asarray(state.anchor, jnp.int32),
        jnp.asarray(state.ntk_alpha, jnp.float32),
    )


# ---------------------------------------------------------------- RoPE


def inv_freq(cfg: ModelConfig, alpha):
    """Inverse frequencies [b, r/2] for per-row NTK alpha [b]."""
    r = cfg.rotary_dim
    base = jnp.float32(cfg.rope_theta) * jnp.ones_like(alpha)
    if isinstance(cfg.rope_scaling, DynamicNTK):
        base = base * alpha ** jnp.float32(r / (r - 2))  # dynamic NTK: stretch the base
    exponents = jnp.arange(0, r, 2, dtype=jnp.float32) / jnp.float32(r)  # [r/2]
    freqs = 1.0 / (base[:, None] ** exponents[None, :])  # [b,1] ** [1,r/2] -> [b,r/2]
    if cfg.rope_f16_freqs:
        freqs = freqs.astype(jnp.float16).astype(jnp.float32)
    if isinstance(cfg.rope_scaling, WavelengthScaling):
        freqs = wavelength_scale(freqs, cfg.rope_scaling)
    return freqs


def wavelength_scale(freqs, scaling: WavelengthScaling):
    """Frequencies scaled by wavelength: long wavelengths / factor, short kept, a smooth band
    between (Llama-3.1's long-context RoPE)."""
    factor, original_len = scaling.factor, scaling.original_len
    low_freq_factor, high_freq_factor = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    low_wavelen = original_len / low_freq_factor
    high_wavelen = original_len / high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled).astype(jnp.float32)


_TABLE_LENGTH: list[int] = []  # while a forward is traced: its cache's length (`rope_tables`)
TABLE_LIMIT = 1 << 18  # most entries of a table (1 MB of float32): a program holds it as a constant


@contextlib.contextmanager
def rope_tables(length: int):
    """While a program is traced: RoPE's cos and sin for positions [0, length) come from tables
    made once on the host with the reference's own arithmetic, looked up by position id, instead
    of being computed in the program (not for dynamic NTK, whose angles follow each row's
    alpha). XLA:CPU fused cos and sin into each rotation and evaluated them per element of q and
    k: 0.13 ms of every layer of a batch-16 decode step of the 156M shape, and an optimization
    barrier did not keep them apart (XLA:CPU drops it before fusing). `model.forward` sets it
    to the cache's length, which bounds every position id it writes. The tables are constants
    of the compiled program: past TABLE_LIMIT entries (length x r/2) the angles are computed."""
    _TABLE_LENGTH.append(int(length))
    try:
        yield
    finally:
        _TABLE_LENGTH.pop()


@functools.lru_cache(maxsize=32)
def host_table(cfg: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, r/2] of positions 0 .. length-1 (alpha 1), as the reference computes
    them for those ids."""
    ids = np.arange(length)[None, :]  # [1,length]
    cos, sin = ref_positions.rope_angles(cfg, ids, np.ones(1, np.float32))  # [1,length,r/2]
    return cos[0], sin[0]


def rope_angles(cfg: ModelConfig, ids, alpha):
    """cos, sin [b,t,r/2] for position ids [b,t] and per-row NTK alpha [b]: looked up in the
    host's tables inside `rope_tables`, else computed here."""
    tables = bool(_TABLE_LENGTH) and _TABLE_LENGTH[-1] * cfg.rotary_dim // 2 <= TABLE_LIMIT
    if tables and not isinstance(cfg.rope_scaling, DynamicNTK):
        cos, sin = host_table(cfg, _TABLE_LENGTH[-1])  # [length,r/2]
        at = ids.astype(jnp.int32)  # [b,t], every id below the cache's length
        return jnp.take(cos, at, axis=0, mode="fill"), jnp.take(sin, at, axis=0, mode="fill")
    angles = ids.astype(jnp.float32)[:, :, None] * inv_freq(cfg, alpha)[:, None, :]  # [b,t,r/2]
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x, cos, sin, style):
    """Rotate pairs of x [b,t,n,r] (n heads, r rotated dims) by angles [b,t,r/2]: pairs
    (j, j+r/2) or (2j, 2j+1)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [b,t,r/2] -> [b,t,1,r/2]
    if style == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]  # [b,t,n,r] -> 2 x [b,t,n,r/2]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # -> [b,t,n,r]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [b,t,n,r] -> 2 x [b,t,n,r/2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # -> [b,t,n,r/2,2]
    return out.reshape(x.shape)  # [b,t,n,r/2,2] -> [b,t,n,r]


def apply_rope(x, cfg: ModelConfig, pos: Positions):
    """RoPE on the first r dims of every head of x [b,t,n,d]; the rest pass through."""
    r = cfg.rotary_dim
    cos, sin = rope_angles(cfg, pos.ids, pos.ntk_alpha)  # [b,t,r/2] each
    rotated = rotate(x[..., :r], cos, sin, cfg.rope_style)  # [b,t,n,r]
    return jnp.concatenate([rotated, x[..., r:]], axis=-1)  # [b,t,n,r] + [b,t,n,d-r] -> [b,t,n,d]


def apply_rope2d(x, cfg: ModelConfig, pos: Positions):
    """2-D RoPE: first half of each head by position id, second half by block position id."""
    half = cfg.head_dim // 2
    out = []
    for j in range(2):
        cos, sin = rope_angles(cfg, pos.ids[..., j], pos.ntk_alpha)
        part = x[..., j * half : (j + 1) * half]  # [b,t,n,d] -> [b,t,n,d/2]
        out.append(rotate(part, cos, sin, cfg.rope_style))
    return jnp.concatenate(out, axis=-1)  # 2 x [b,t,n,d/2] -> [b,t,n,d]


def no_rotation(x, cfg, pos):
    return x


ROTATIONS = {
    "rope": apply_rope,
    "rope2d": apply_rope2d,
    "alibi": no_rotation,
    "learned": no_rotation,
}


def learned_positions(table, cfg: ModelConfig, pos: Positions):
    """Rows of the learned position table for position ids [b,t] (bounds checked on the host)."""
    return take_rows(table, pos.ids + cfg.pos_offset)  # [b,t,e]


def logn_scale(cfg: ModelConfig, pos: Positions):
    """Query scale [b,t]: log(p+1)/log(n) for positions p+1 > n = logn_len, else 1."""
    p1 = pos.ids.astype(jnp.float32) + 1  # [b,t]
    scale = jnp.where(p1 > cfg.logn_len, jnp.log(p1) / np.float32(math.log(cfg.logn_len)), 1.0)
    return scale.astype(jnp.float32)
