"""The KV cache as a value: preallocated per-layer arrays `[b, k, s, d]` and pure writes.

`write(cache, layer, k, v, slots)` returns a new cache with the new keys and values placed at
their slots (the JAX backend does the same with donated buffers, so its writes are in place).
Attention always reads K and V back from the cache after writing, in prefill and in decode, so
prefilling T tokens equals T single-token steps for every storage dtype.

Storage formats (a runtime setting, never part of the model config) are entries of
`KV_FORMATS`: float32, float16, bfloat16 (bit patterns in uint16, NumPy has no bf16) and int8
with one float32 scale per (batch, kv head, token) for K and for V (PAPER.md section 3; K is
quantised after RoPE and q/k norm, because the cache stores what attention reads). Attention
reads a layer through `LayerKV`: the definition (`attention.naive_attention`) dequantises it
whole (`dequantized`); SlimAttention and the flash baseline widen one block of keys or values
to float32 at a time, with scales applied to score columns and folded into probabilities
(`key_blocks.py`), so they build no float copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .quant import from_bf16_bits, quantize, to_bf16_bits


@dataclass(frozen=True)
class KVFormat:
    """How one K or V vector of d values is stored: a table entry, so no code compares names.

    `encode` maps float32 [..., d] to (stored [..., d // pack], float32 scale [...] or None);
    `widen` maps stored values back to float32 [..., d] without the scale, which attention
    applies to score columns and folds into probabilities (the hybrid formulation)."""

    name: str
    storage: type  # NumPy dtype of the stored values
    scaled: bool  # one float32 scale per (batch, kv head, token) travels with the values
    encode: Callable
    widen: Callable
    pack: int = 1  # values per stored element (a packed 4-bit format would say 2)

    @property
    def wide(self) -> bool:
        """Stored as unscaled float32: reading converts nothing."""
        return np.dtype(self.storage) == np.float32 and not self.scaled and self.pack == 1

    def stored_dim(self, d: int) -> int:
        return d // self.pack

    def bytes_per_vector(self, d: int) -> int:
        """Bytes one head's d values of one token cost, with its scale."""
        return self.stored_dim(d) * np.dtype(self.storage).itemsize + 4 * self.scaled


def _cast(dtype):
    return lambda x: (x.astype(dtype), None)


def _to_float32(x):
    return x if x.dtype == np.float32 else x.astype(np.float32)


KV_FORMATS = {
    fmt.name: fmt
    for fmt in (
        KVFormat("float32", np.float32, False, _cast(np.float32), _to_float32),
        KVFormat("float16", np.float16, False, _cast(np.float16), _to_float32),
        # bfloat16 has no NumPy dtype: its bit patterns are stored in uint16 (quant.py)
        KVFormat("bfloat16", np.uint16, False, lambda x: (to_bf16_bits(x), None), from_bf16_bits),
        KVFormat("int8", np.int8, True, quantize, _to_float32),
    )
}
KV_DTYPES = tuple(KV_FORMATS)


def kv_format(name: str) -> KVFormat:
    if name not in KV_FORMATS:
        raise ValueError(f"unknown kv cache dtype {name!r}: expected one of {KV_DTYPES}")
    return KV_FORMATS[name]


@dataclass
class KVCache:
    k: tuple  # per layer [b,k,s,d] in the format's storage dtype
    v: tuple
    k_scale: tuple | None = None  # scaled formats only: per layer [b,k,s] float32
    v_scale: tuple | None = None
    format: str = "float32"  # a KV_FORMATS name

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, fmt: str = "float32") -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens."""
    kind = kv_format(fmt)
    shape = (batch, cfg.n_kv_heads, max_len, kind.stored_dim(cfg.head_dim))  # [b,k,s,d]

    def zeros(shape, dt):
        return tuple(np.zeros(shape, dt) for _ in range(cfg.n_layers))

    scales = zeros(shape[:3], np.float32) if kind.scaled else None  # [b,k,s]
    return KVCache(zeros(shape, kind.storage), zeros(shape, kind.storage), scales, scales, fmt)


def encode(x, fmt: str):
    """float32 [..., d] -> (stored values, scale [...] or None)."""
    return kv_format(fmt).encode(x)


def check_fits(cache: KVCache, slots) -> None:
    """Raise when a slot is past the cache's preallocated length, or when a row's slots are not
    one run of consecutive slots (what `positions_for` makes, and what lets the JAX backend
    write each row with one in-place dynamic_update_slice)."""
    if slots.size and int(slots.max()) >= cache.max_len:
        raise ValueError(
            f"sequence needs {int(slots.max()) + 1} positions but the cache holds {cache.max_len}"
        )
    if slots.size and np.any(np.diff(slots, axis=-1) != 1):
        raise ValueError("each row's cache slots must be consecutive (one run per row)")


def _replace_layer(layers: tuple | None, layer: int, value):
    return None if layers is None else layers[:layer] + (value,) + layers[layer + 1 :]


def write(cache: KVCache, layer: int, k, v, slots) -> KVCache:
    """Place k, v [b,t,k,d] at slots [b,t] of `layer` (consecutive per row); returns the new
    cache."""
    check_fits(cache, slots)
    rows = np.arange(k.shape[0])[:, None]  # [b,1]
    out = {}
    for name, x in (("k", k), ("v", v)):
        stored, scale = encode(x, cache.format)
        values = getattr(cache, name)[layer].copy()
        values[rows, :, slots] = stored  # [b,t,k,d] into [b,k,s,d] at (row, :, slot)
        out[name] = _replace_layer(getattr(cache, name), layer, values)
        if scale is not None:
            scales = getattr(cache, f"{name}_scale")[layer].copy()
            scales[rows, :, slots] = scale  # [b,t,k] into [b,k,s]
            out[f"{name}_scale"] = _replace_layer(getattr(cache, f"{name}_scale"), layer, scales)
    return dataclasses.replace(cache, **out)


@dataclass
class LayerKV:
    """One layer's stored K/V as attention reads them: float32 one key block at a time."""

    k: np.ndarray  # [b,k,s,d] storage dtype
    v: np.ndarray
    k_scale: np.ndarray | None  # [b,k,s] (scaled formats)
    v_scale: np.ndarray | None
    fmt: KVFormat

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def keys(self, lo: int, hi: int):
        """Keys of slots [lo, hi) as float32 [b,k,n,d]: scales are NOT applied here."""
        return self.fmt.widen(self.k[:, :, lo:hi])  # [b,k,s,d] -> [b,k,n,d]

    def values(self, lo: int, hi: int):
        return self.fmt.widen(self.v[:, :, lo:hi])  # [b,k,s,d] -> [b,k,n,d]


def read(cache: KVCache, layer: int) -> LayerKV:
    """What attention reads for `layer` (the stored arrays, no conversion yet)."""
    k_scale = cache.k_scale[layer] if cache.k_scale is not None else None
    v_scale = cache.v_scale[layer] if cache.v_scale is not None else None
    return LayerKV(cache.k[layer], cache.v[layer], k_scale, v_scale, kv_format(cache.format))


def dequantized(kv: LayerKV):
    """Full float32 K and V of a layer [b,k,s,d] (int8: values * their per-token scales): for
    the definition of attention and tests, never on a hot path."""
    k, v = kv.keys(0, kv.length), kv.values(0, kv.length)  # widened [b,k,s,d]
    if kv.k_scale is not None:
        k = k * kv.k_scale[..., None]  # [b,k,s,d] * [b,k,s,1]
        v = v * kv.v_scale[..., None]  # [b,k,s,d] * [b,k,s,1]
    return k, v


def nbytes_per_token(cfg: ModelConfig, fmt: str = "float32") -> int:
    """Cache bytes one token costs across all layers, keys and values (with their scales)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * kv_format(fmt).bytes_per_vector(cfg.head_dim)
