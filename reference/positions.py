"""Where each token is: cache slots, position ids, and the position encodings built from them.

One concept carries position through generation: a sequence's `SeqState`, made from the
prompts by `start_state` (how many tokens each row has in the cache, plus facts read off the
prompt: the prefix-LM length, the 2-D RoPE anchor, the dynamic-NTK alpha) and moved on by
`advance`. A forward call takes the state and derives, for its t new tokens, their `Positions`
(`positions_for`): the cache slot of every query token (slots define causality and where K/V
are written), the position id fed to RoPE or the learned table (the slot for most models; two
ids per token for 2-D RoPE), the prefix-LM length and the dynamic-NTK alpha of each row.

Encodings: RoPE (rotate-half or interleaved pairs, partial rotation, Llama-3.1 frequency
scaling, dynamic-NTK base scaling, float16-rounded frequencies), 2-D RoPE (first half of each
head by position, second half by block position), ALiBi slopes, learned positions and logN
query scaling. Frequencies are computed in float32, as the upstream definitions do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import DynamicNTK, ModelConfig, WavelengthScaling
from .errors import OptionError
from .weight_format import take_rows


@dataclass
class Positions:
    slots: np.ndarray  # [b,t] int: cache slot of each query token
    ids: np.ndarray  # [b,t] int, or [b,t,2] for rope2d (position, block position)
    prefix: np.ndarray  # [b] int: keys at slots < prefix are visible to every query
    ntk_alpha: np.ndarray  # [b] float32: dynamic-NTK base scaling (1 = none)


@dataclass
class SeqState:
    """Per-row facts that fix the positions of every later token of a sequence."""

    lengths: np.ndarray  # [b] int: tokens already in the cache
    prefix: np.ndarray  # [b] int: prefix-LM length (index of the block start token), else 0
    anchor: np.ndarray  # [b] int: rope2d anchor (index of the mask token), else 0
    ntk_alpha: np.ndarray  # [b] float32


def ntk_alpha(length: int, trained_len: int) -> float:
    """Dynamic-NTK alpha for a prompt of `length`: 2^ceil(log2(length/trained) + 1) - 1, >= 1."""
    context = math.log(length / trained_len, 2) + 1
    return float(max(2 ** math.ceil(context) - 1, 1))


def start_state(cfg: ModelConfig, prompts: list) -> SeqState:
    """The state before a prompt is prefilled: facts read off each prompt's tokens."""
    b = len(prompts)
    prefix = np.zeros(b, np.int64)
    anchor = np.zeros(b, np.int64)
    alpha = np.ones(b, np.float32)
    for r, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if cfg.prefix_lm:
            if cfg.block_start_id not in prompt:
                raise OptionError(
                    f"prompt row {r} lacks the block start token {cfg.block_start_id}: "
                    "this model needs its tokenizer's special suffix (e.g. [gMASK] <sop>)"
                )
            prefix[r] = prompt.index(cfg.block_start_id)
            anchors = [a for a in cfg.block_anchor_ids if a in prompt]
            if cfg.pos == "rope2d" and not anchors:
                raise OptionError(
                    f"prompt row {r} has none of the mask tokens {cfg.block_anchor_ids}"
                )
            anchor[r] = prompt.index(anchors[0]) if anchors else 0
        if isinstance(cfg.rope_scaling, DynamicNTK):
            alpha[r] = ntk_alpha(len(prompt), cfg.rope_scaling.trained_len)
    return SeqState(np.zeros(b, np.int64), prefix, anchor, alpha)


def positions_for(cfg: ModelConfig, state: SeqState, t: int) -> Positions:
    """Positions of the next t tokens of every row (slots continue from state.lengths)."""
    slots = state.lengths[:, None] + np.arange(t)[None, :]  # [b,1] + [1,t] -> [b,t]
    if cfg.pos == "rope2d":
        ctx = state.prefix[:, None]  # [b] -> [b,1]
        in_block = slots >= ctx
        pos = np.where(in_block, state.anchor[:, None], slots)
        block = np.where(in_block, slots - ctx + 1, 0)
        ids = np.stack([pos, block], axis=-1)  # 2 x [b,t] -> [b,t,2]
    else:
        ids = slots
    return Positions(slots, ids, state.prefix.copy(), state.ntk_alpha.copy())


def advance(state: SeqState, n) -> SeqState:
    """The state after n more tokens (int, or [b]) were written for each row."""
    return SeqState(state.lengths + n, state.prefix, state.anchor, state.ntk_alpha)


# ---------------------------------------------------------------- RoPE


def inv_freq(cfg: ModelConfig, alpha: float = 1.0) -> np.ndarray:
    """Inverse frequencies [r/2] of the rotated dims, with the config's scaling applied."""
    r = cfg.rotary_dim
    base = cfg.rope_theta
    if alpha != 1.0:
        base = base * alpha ** (r / (r - 2))  # dynamic NTK: stretch the base
    exponents = np.arange(0, r, 2, dtype=np.float32) / np.float32(r)  # [r/2]
    freqs = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)  # [r/2]
    if cfg.rope_f16_freqs:
        freqs = freqs.astype(np.float16).astype(np.float32)
    if isinstance(cfg.rope_scaling, WavelengthScaling):
        freqs = wavelength_scale(freqs, cfg.rope_scaling)
    return freqs


def wavelength_scale(freqs, scaling: WavelengthScaling):
    """Frequencies scaled by wavelength: long wavelengths / factor, short kept, a smooth band
    between (Llama-3.1's long-context RoPE)."""
    factor, original_len = scaling.factor, scaling.original_len
    low_freq_factor, high_freq_factor = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * np.pi / freqs
    low_wavelen = original_len / low_freq_factor
    high_wavelen = original_len / high_freq_factor
    scaled = np.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(cfg: ModelConfig, ids, alpha):
    """cos, sin [b,t,r/2] for position ids [b,t] and per-row NTK alpha [b]."""
    b = ids.shape[0]
    freqs = np.stack([inv_freq(cfg, float(alpha[row])) for row in range(b)])  # -> [b,r/2]
    angles = ids.astype(np.float32)[:, :, None] * freqs[:, None, :]  # [b,t,1] * [b,1,r/2]
    return np.cos(angles), np.sin(angles)


def rotate(x, cos, sin, style):
    """Rotate pairs of x [b,t,n,r] (n heads, r rotated dims) by angles [b,t,r/2]: pairs
    (j, j+r/2) or (2j, 2j+1)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [b,t,r/2] -> [b,t,1,r/2]
    if style == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]  # [b,t,n,r] -> 2 x [b,t,n,r/2]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # -> [b,t,n,r]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [b,t,n,r] -> 2 x [b,t,n,r/2]
    out = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # -> [b,t,n,r/2,2]
    return out.reshape(x.shape)  # [b,t,n,r/2,2] -> [b,t,n,r]


def apply_rope(x, cfg: ModelConfig, pos: Positions):
    """RoPE on the first r dims of every head of x [b,t,n,d]; the rest pass through."""
    r = cfg.rotary_dim
    cos, sin = rope_angles(cfg, pos.ids, pos.ntk_alpha)  # [b,t,r/2] each
    rotated = rotate(x[..., :r], cos, sin, cfg.rope_style)  # [b,t,n,r]
    return np.concatenate([rotated, x[..., r:]], axis=-1)  # [b,t,n,r] + [b,t,n,d-r] -> [b,t,n,d]


def apply_rope2d(x, cfg: ModelConfig, pos: Positions):
    """2-D RoPE: first half of each head by position id, second half by block position id."""
    half = cfg.head_dim // 2
    out = []
    for j in range(2):
        cos, sin = rope_angles(cfg, pos.ids[..., j], pos.ntk_alpha)
        part = x[..., j * half : (j + 1) * half]  # [b,t,n,d] -> [b,t,n,d/2]
        out.append(rotate(part, cos, sin, cfg.rope_style))
    return np.concatenate(out, axis=-1)  # 2 x [b,t,n,d/2] -> [b,t,n,d]


def no_rotation(x, cfg, pos):
    return x


ROTATIONS = {
    "rope": apply_rope,
    "rope2d": apply_rope2d,
    "alibi": no_rotation,
    "learned": no_rotation,
}


# ---------------------------------------------------------------- other encodings


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi slopes: p = 2^floor(log2 n); h < p: 2^(-8(h+1)/p), else 2^(-8(2(h-p)+1)/(2p))."""
    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / p) for h in range(min(p, n_heads))]
    slopes += [2.0 ** (-8.0 * (2 * (h - p) + 1) / (2 * p)) for h in range(p, n_heads)]
    return np.array(slopes, np.float32)


def learned_positions(table, cfg: ModelConfig, pos: Positions):
    """Rows of the learned position table [max_len + offset, e] for position ids [b,t]."""
    if pos.ids.max(initial=0) + cfg.pos_offset >= table.shape[0]:
        raise OptionError(
            f"position {int(pos.ids.max())} is past the learned table ({cfg.max_len})"
        )
    return take_rows(table, pos.ids + cfg.pos_offset)  # [b,t,e]


def logn_scale(cfg: ModelConfig, pos: Positions):
    """Query scale [b,t]: log(p+1)/log(n) for positions p+1 > n = logn_len, else 1."""
    p1 = pos.ids.astype(np.float64) + 1  # [b,t]
    scale = np.where(p1 > cfg.logn_len, np.log(p1) / math.log(cfg.logn_len), 1.0)
    return scale.astype(np.float32)
