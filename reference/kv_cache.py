"""The KV cache as a value: preallocated per-layer arrays `[b, k, s, d]` and pure writes.

`write(cache, layer, k, v, slots)` returns a new cache with the new keys and values placed at
their slots (the JAX backend does the same with donated buffers, so its writes are in place).
Attention always reads K and V back from the cache after writing, in prefill and in decode, so
prefilling T tokens equals T single-token steps. The storage dtype is a runtime setting
(`kv_dtype`), never part of the model config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig

KV_DTYPES = ("float32",)


@dataclass
class KVCache:
    k: tuple  # per layer [b,k,s,d]
    v: tuple  # per layer [b,k,s,d]
    dtype: str = "float32"

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "float32") -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens."""
    if dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv cache dtype {dtype!r}: expected one of {KV_DTYPES}")
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    zeros = tuple(np.zeros(shape, np.float32) for _ in range(cfg.n_layers))
    return KVCache(zeros, tuple(np.zeros(shape, np.float32) for _ in range(cfg.n_layers)), dtype)


def check_fits(cache: KVCache, slots) -> None:
    """Raise when a slot is past the cache's preallocated length."""
    if slots.size and int(slots.max()) >= cache.max_len:
        raise ValueError(
            f"sequence needs {int(slots.max()) + 1} positions but the cache holds {cache.max_len}"
        )


def write(cache: KVCache, layer: int, k, v, slots) -> KVCache:
    """Place k, v [b,t,k,d] at slots [b,t] of `layer`; returns the new cache."""
    check_fits(cache, slots)
    rows = np.arange(k.shape[0])[:, None]  # [b,1]
    new_k, new_v = cache.k[layer].copy(), cache.v[layer].copy()
    new_k[rows, :, slots] = k  # [b,t,k,d] into [b,k,s,d] at (row, :, slot)
    new_v[rows, :, slots] = v
    ks = cache.k[:layer] + (new_k,) + cache.k[layer + 1 :]
    vs = cache.v[:layer] + (new_v,) + cache.v[layer + 1 :]
    return dataclasses.replace(cache, k=ks, v=vs)


def read(cache: KVCache, layer: int):
    """Keys and values [b,k,s,d] of `layer`."""
    return cache.k[layer], cache.v[layer]


def nbytes_per_token(cfg: ModelConfig, dtype: str = "float32") -> int:
    """Cache bytes one token costs across all layers (keys and values)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
