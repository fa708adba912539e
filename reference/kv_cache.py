"""The KV cache as a value: preallocated per-layer arrays `[b, k, s, d]` and pure writes.

`write(cache, layer, k, v, slots)` returns a new cache with the new keys and values placed at
their slots (the JAX backend does the same with donated buffers, so its writes are in place).
Attention always reads K and V back from the cache after writing, in prefill and in decode, so
prefilling T tokens equals T single-token steps for every storage dtype.

Storage dtypes (a runtime setting, never part of the model config): float32, float16, bfloat16
(bit patterns in uint16, NumPy has no bf16) and int8 with one float32 scale per (batch, kv head,
token) for K and for V (PAPER.md section 3; K is quantised after RoPE and q/k norm, because the
cache stores what attention reads). Attention reads a layer through `LayerKV`: the definition
(`attention.naive_attention`) dequantises it whole (`dequantized`); SlimAttention and the flash
baseline widen one block of keys or values to float32 at a time, with int8 scales applied to
score columns and folded into probabilities (`key_blocks.py`), so they build no float copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .quant import from_bf16_bits, quantize, to_bf16_bits

STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}
KV_DTYPES = tuple(STORAGE)


@dataclass
class KVCache:
    k: tuple  # per layer [b,k,s,d] in the storage dtype
    v: tuple
    k_scale: tuple | None = None  # int8 only: per layer [b,k,s] float32
    v_scale: tuple | None = None
    dtype: str = "float32"

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "float32") -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens."""
    if dtype not in STORAGE:
        raise ValueError(f"unknown kv cache dtype {dtype!r}: expected one of {KV_DTYPES}")
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)  # [b,k,s,d]

    def zeros(shape, dt):
        return tuple(np.zeros(shape, dt) for _ in range(cfg.n_layers))

    scales = dtype == "int8"
    return KVCache(
        zeros(shape, STORAGE[dtype]),
        zeros(shape, STORAGE[dtype]),
        zeros(shape[:3], np.float32) if scales else None,  # [b,k,s]
        zeros(shape[:3], np.float32) if scales else None,
        dtype,
    )


def encode(x, dtype: str):
    """float32 [..., d] -> (stored values, scale [...] or None)."""
    if dtype == "int8":
        return quantize(x)
    if dtype == "bfloat16":
        return to_bf16_bits(x), None
    return x.astype(STORAGE[dtype]), None


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


def replace_layer(layers: tuple | None, layer: int, value):
    return None if layers is None else layers[:layer] + (value,) + layers[layer + 1 :]


def write(cache: KVCache, layer: int, k, v, slots) -> KVCache:
    """Place k, v [b,t,k,d] at slots [b,t] of `layer` (consecutive per row); returns the new
    cache."""
    check_fits(cache, slots)
    rows = np.arange(k.shape[0])[:, None]  # [b,1]
    out = {}
    for name, x in (("k", k), ("v", v)):
        stored, scale = encode(x, cache.dtype)
        values = getattr(cache, name)[layer].copy()
        values[rows, :, slots] = stored  # [b,t,k,d] into [b,k,s,d] at (row, :, slot)
        out[name] = replace_layer(getattr(cache, name), layer, values)
        if scale is not None:
            scales = getattr(cache, f"{name}_scale")[layer].copy()
            scales[rows, :, slots] = scale  # [b,t,k] into [b,k,s]
            out[f"{name}_scale"] = replace_layer(getattr(cache, f"{name}_scale"), layer, scales)
    return dataclasses.replace(cache, **out)


@dataclass
class LayerKV:
    """One layer's stored K/V as attention reads them: float32 one key block at a time."""

    k: np.ndarray  # [b,k,s,d] storage dtype
    v: np.ndarray
    k_scale: np.ndarray | None  # [b,k,s] (int8)
    v_scale: np.ndarray | None
    dtype: str

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def widen(self, x):
        if self.dtype == "bfloat16":
            return from_bf16_bits(x)
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def keys(self, lo: int, hi: int):
        """Keys of slots [lo, hi) as float32 [b,k,n,d], n = hi - lo: int8 values are NOT scaled
        here."""
        return self.widen(self.k[:, :, lo:hi])  # [b,k,s,d] -> [b,k,n,d]

    def values(self, lo: int, hi: int):
        return self.widen(self.v[:, :, lo:hi])  # [b,k,s,d] -> [b,k,n,d]


def read(cache: KVCache, layer: int) -> LayerKV:
    """What attention reads for `layer` (the stored arrays, no conversion yet)."""
    k_scale = cache.k_scale[layer] if cache.k_scale is not None else None
    v_scale = cache.v_scale[layer] if cache.v_scale is not None else None
    return LayerKV(cache.k[layer], cache.v[layer], k_scale, v_scale, cache.dtype)


def dequantized(kv: LayerKV):
    """Full float32 K and V of a layer [b,k,s,d] (int8: values * their per-token scales): for
    the definition of attention and tests, never on a hot path."""
    k, v = kv.keys(0, kv.length), kv.values(0, kv.length)  # widened [b,k,s,d]
    if kv.k_scale is not None:
        k = k * kv.k_scale[..., None]  # [b,k,s,d] * [b,k,s,1]
        v = v * kv.v_scale[..., None]  # [b,k,s,d] * [b,k,s,1]
    return k, v


def nbytes_per_token(cfg: ModelConfig, dtype: str = "float32") -> int:
    """Cache bytes one token costs across all layers, keys and values (int8: + a scale each)."""
    if dtype not in STORAGE:
        raise ValueError(f"unknown kv cache dtype {dtype!r}: expected one of {KV_DTYPES}")
    per_vector = cfg.head_dim * np.dtype(STORAGE[dtype]).itemsize + (4 if dtype == "int8" else 0)
    return 2 * cfg.n_layers * cfg.n_kv_heads * per_vector
