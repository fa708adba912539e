"""The architecture of a decoder-only transformer, as one frozen dataclass.

Every family slimllm runs (Llama, Qwen, ChatGLM, Baichuan, OPT) is a point in this space: the
fields name the maths (which norm, which positions, which MLP), never a family. Family names and
hub config keys live only in `slimllm.weights.families`. The config is hashable so the JAX
backend can use it as a static jit argument; runtime settings (batch, cache length, cache dtype,
attention kind, tp) live elsewhere and never edit it. Every field is checked by type and range
when a config is made, whichever loader makes it (a `ConfigError` naming the field): a head count
of 0, a negative eps or a float width is refused here, not met later as a crash or nonsense.

Shape letters used across the code: b batch, t query positions, s key positions, e model width,
h query heads, k kv heads, g heads per kv head, d head dim, f ffn width, v vocab.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .errors import ConfigError, shown

NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu", "relu")
POSITIONS = ("rope", "rope2d", "alibi", "learned")
ROPE_STYLES = ("half", "interleaved")
RESIDUALS = ("pre_norm", "post_norm", "normed_input")

# Bounds of a plausible value. Sizes and positions are int32 indices in the JAX backend; every
# layer is named in the loader's plan, so a layer count past a few thousand is no model; a float
# past 1e30 (a RoPE base, a scale) overflows float32 once raised to a power.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 4096
MAX_FLOAT = 1e30
FLAGS = ("rope_f16_freqs", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "final_norm", "tied_head")


def integer(name: str, value, low: int = 1, high: int = MAX_SIZE) -> int:
    """`value` if it is an integer (a bool is not) in [low, high], else a ConfigError naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not low <= value <= high
    ):
        raise ConfigError(f"{name}={shown(value)}: expected an integer in [{low}, {high}]")
    return value


def number(name: str, value, low: float = 0.0, high: float = MAX_FLOAT) -> float:
    """`value` if it is a number (an int or a float; a bool is not) in (low, high]: NaN and the
    infinities never are (the comparison is exact, so an int too large for a float is refused
    too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < value <= high:
        raise ConfigError(f"{name}={shown(value)}: expected a number in ({low:g}, {high:g}]")
    return value


def boolean(name: str, value) -> bool:
    """`value` if it is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={shown(value)}: expected true or false")
    return value


@dataclass(frozen=True)
class WavelengthScaling:
    """RoPE frequencies scaled by their wavelength (as in Llama-3.1): wavelengths longer than
    original_len / low_freq_factor are stretched by `factor`, those shorter than
    original_len / high_freq_factor are kept, and the band between is interpolated smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_len: int  # the context length the frequencies were trained for

    def __post_init__(self):
        number("WavelengthScaling.factor", self.factor)
        number("WavelengthScaling.low_freq_factor", self.low_freq_factor)
        number("WavelengthScaling.high_freq_factor", self.high_freq_factor)
        integer("WavelengthScaling.original_len", self.original_len)
        if self.high_freq_factor <= self.low_freq_factor:  # the smooth band divides by the gap
            raise ConfigError(
                f"WavelengthScaling.high_freq_factor={self.high_freq_factor!r}: expected more "
                f"than low_freq_factor={self.low_freq_factor!r}"
            )


@dataclass(frozen=True)
class DynamicNTK:
    """RoPE base stretched by alpha^(r/(r-2)), with alpha fixed by the prompt's length: 1 up to
    trained_len, then 2^ceil(log2(length / trained_len) + 1) - 1 (`positions.ntk_alpha`)."""

    trained_len: int

    def __post_init__(self):
        integer("DynamicNTK.trained_len", self.trained_len)


ROPE_SCALINGS = (WavelengthScaling, DynamicNTK)


@dataclass(frozen=True)
class ModelConfig:
    vocab: int  # v
    width: int  # e
    n_layers: int
    n_heads: int  # h
    n_kv_heads: int  # k
    head_dim: int  # d
    ffn_width: int  # f
    max_len: int  # longest sequence the model was built for (positions table, default cache)
    norm: str = "rms"  # "rms" | "layer" (with bias)
    norm_eps: float = 1e-5
    mlp: str = (
        "swiglu"  # "swiglu": down(silu(gate x) * up x); "gelu" (tanh) / "relu": down(act(up x))
    )
    pos: str = "rope"  # "rope" | "rope2d" (two position ids, one per half) | "alibi" | "learned"
    rope_style: str = "half"  # pairs (j, j + r/2) or interleaved (2j, 2j+1) within the rotated part
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # rotate only the first r = fraction * d dims of each head
    rope_scaling: WavelengthScaling | DynamicNTK | None = None  # long-context RoPE, if any
    rope_f16_freqs: bool = False  # inverse frequencies rounded to float16 (an upstream quirk)
    pos_offset: int = 0  # learned positions: row = position + offset
    logn_len: int = 0  # > 0: queries past this position are scaled by log_len(position + 1)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over d on each q and k head before positions
    residual: str = "pre_norm"  # "pre_norm" | "post_norm" | "normed_input" (alpha * LN(x) + f)
    residual_alpha: float = 1.0  # scale of the normed input in the "normed_input" residual
    final_norm: bool = True
    tied_head: bool = False  # lm_head is the embedding table
    embed_width: int = 0  # > 0 and != width: embeddings live in a smaller space, projected in/out
    # Prefix-LM / 2-D positions: the token that opens the generated block, and the mask tokens
    # whose index anchors the first position id of every token in that block.
    block_start_id: int = -1
    block_anchor_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("mlp", self.mlp, MLPS),
            ("pos", self.pos, POSITIONS),
            ("rope_style", self.rope_style, ROPE_STYLES),
            ("residual", self.residual, RESIDUALS),
        ):
            if not isinstance(value, str) or value not in allowed:
                raise ConfigError(f"ModelConfig.{name}={shown(value)}: expected one of {allowed}")
        self.check_ranges()
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, ROPE_SCALINGS):
            raise ConfigError(
                f"ModelConfig.rope_scaling={self.rope_scaling!r}: expected None or one of "
                f"{tuple(kind.__name__ for kind in ROPE_SCALINGS)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} (query heads) is not a multiple of "
                f"n_kv_heads={self.n_kv_heads} (key/value heads)"
            )
        if self.pos in ("rope", "rope2d") and (self.rotary_dim % 2 or self.rotary_dim < 2):
            raise ConfigError(
                f"rotary dim {self.rotary_dim} (head_dim={self.head_dim} * "
                f"rope_fraction={self.rope_fraction}) must be even and at least 2"
            )
        if self.pos == "rope2d" and (self.head_dim % 4 or self.block_start_id < 0):
            raise ConfigError(
                f"rope2d needs head_dim % 4 == 0 (head_dim={self.head_dim}) and a block_start_id"
            )
        if self.logn_len and self.pos == "rope2d":
            raise ConfigError("logN query scaling with rope2d is not defined (two position ids)")
        if isinstance(self.rope_scaling, DynamicNTK) and self.rotary_dim <= 2:
            raise ConfigError(f"dynamic NTK needs a rotary dim > 2, got {self.rotary_dim}")

    def check_ranges(self):
        """Every field of the right type and in range: sizes positive, eps and scales positive
        and finite, token ids inside the vocabulary."""
        for name in ("vocab", "width", "n_heads", "head_dim", "ffn_width", "max_len"):
            integer(f"ModelConfig.{name}", getattr(self, name))
        integer("ModelConfig.n_layers", self.n_layers, high=MAX_LAYERS)
        integer("ModelConfig.n_kv_heads", self.n_kv_heads, high=self.n_heads)
        for name in ("pos_offset", "logn_len", "embed_width"):
            integer(f"ModelConfig.{name}", getattr(self, name), low=0)
        integer("ModelConfig.block_start_id", self.block_start_id, low=-1, high=self.vocab - 1)
        if not isinstance(self.block_anchor_ids, tuple):
            raise ConfigError(
                f"ModelConfig.block_anchor_ids={shown(self.block_anchor_ids)}: expected a tuple"
            )
        for i in self.block_anchor_ids:
            integer("ModelConfig.block_anchor_ids[]", i, low=0, high=self.vocab - 1)
        number("ModelConfig.norm_eps", self.norm_eps, high=1.0)  # a variance floor, not a scale
        number("ModelConfig.rope_theta", self.rope_theta, low=1.0)  # wavelengths grow with it
        number("ModelConfig.rope_fraction", self.rope_fraction, high=1.0)
        number("ModelConfig.residual_alpha", self.residual_alpha)
        for name in FLAGS:
            boolean(f"ModelConfig.{name}", getattr(self, name))

    @property
    def n_rep(self) -> int:
        """Query heads per kv head (g)."""
        return self.n_heads // self.n_kv_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (r); rope2d rotates each half with its own id."""
        if self.pos == "rope2d":
            return self.head_dim // 2
        return int(self.head_dim * self.rope_fraction)

    @property
    def prefix_lm(self) -> bool:
        """Tokens before the block start see each other bidirectionally."""
        return self.block_start_id >= 0

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def n_params(self) -> int:
        """Number of weights (embeddings and head counted once when tied)."""
        e, f, d = self.width, self.ffn_width, self.head_dim
        attn = e * d * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = e * f * (3 if self.mlp == "swiglu" else 2)
        ew = self.embed_width or e
        head = 0 if self.tied_head else self.vocab * ew
        return self.n_layers * (attn + mlp) + self.vocab * ew + head
