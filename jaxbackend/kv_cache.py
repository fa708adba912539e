"""The KV cache as a value, in JAX: the reference's `kv_cache.py` with scatter writes.

The same `KVCache` class, registered as a pytree; under jit the cache is donated, so
`write` updates the buffers in place. bfloat16 is stored as `jnp.bfloat16` (the reference keeps
the same bits in uint16). `LayerKV` gives attention one block of keys or values widened to
float32 at a time (`lax.dynamic_slice` on the stored array: never a float copy of the cache).
The preallocated length is rounded up to whole key blocks (or tiles, for short caches), so
blocks and tiles never overhang the end; the extra slots are in every query's future.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from slimllm.kernels import cache as cache_kernel
from slimllm.reference.config import ModelConfig
from slimllm.reference.kv_cache import KV_DTYPES, KVCache, KVFormat, nbytes_per_token

from .quant import quantize

__all__ = ["KVCache", "KV_DTYPES", "nbytes_per_token", "init_cache", "write", "read", "LayerKV"]


def _cast(dtype):
    return lambda x: (x.astype(dtype), None)


def _to_float32(x):
    return x.astype(jnp.float32)


# The reference's table with JAX storage (bfloat16 is a real dtype here); same names, same maths.
KV_FORMATS = {
    fmt.name: fmt
    for fmt in (
        KVFormat("float32", jnp.float32, False, _cast(jnp.float32), _to_float32),
        KVFormat("float16", jnp.float16, False, _cast(jnp.float16), _to_float32),
        KVFormat("bfloat16", jnp.bfloat16, False, _cast(jnp.bfloat16), _to_float32),
        KVFormat("int8", jnp.int8, True, quantize, _to_float32),
    )
}


def kv_format(name: str) -> KVFormat:
    if name not in KV_FORMATS:
        raise ValueError(f"unknown kv cache dtype {name!r}: expected one of {KV_DTYPES}")
    return KV_FORMATS[name]


KEY_BLOCK = 256  # keys widened to float32 at a time
TILE = 64  # every cache length is a multiple of this, so key tiles never overhang

jax.tree_util.register_dataclass(
    KVCache, data_fields=["k", "v", "k_scale", "v_scale"], meta_fields=["format"]
)


def padded_len(max_len: int) -> int:
    """Cache length rounded up to whole tiles (<= one key block) or whole key blocks."""
    unit = TILE if max_len <= KEY_BLOCK else KEY_BLOCK
    return -(-max_len // unit) * unit


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, fmt: str = "float32", kv_heads: int | None = None
) -> KVCache:
    """An empty cache; `kv_heads` (default: the model's) is what this process holds under
    tensor parallelism (tp.ShardPlan)."""
    kind = kv_format(fmt)
    k = cfg.n_kv_heads if kv_heads is None else kv_heads
    shape = (batch, k, padded_len(max_len), kind.stored_dim(cfg.head_dim))  # [b,k,s,d]

    def zeros(shape, dt):
        return tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))

    return KVCache(
        zeros(shape, kind.storage),
        zeros(shape, kind.storage),
        zeros(shape[:3], jnp.float32) if kind.scaled else None,  # [b,k,s]
        zeros(shape[:3], jnp.float32) if kind.scaled else None,
        fmt,
    )


def encode(x, fmt: str):
    return kv_format(fmt).encode(x)


def _replace_layer(layers, layer: int, value):
    return None if layers is None else layers[:layer] + (value,) + layers[layer + 1 :]


def each_row(layer, rows, starts):
    """layer [b,k,s,...] with row r's entries rows[r] [k,t,...] written from slot starts[r]: by
    the compiled kernel, in place (`kernels.cache`), else one `dynamic_update_slice` per row in
    a loop: unrolled, XLA fused the updates of a batch into one loop fusion that copied the
    layer first (16 copies per decode step at batch 2 or more)."""
    written = cache_kernel.write_rows(layer, rows, starts)
    if written is not None:
        return written

    def put(r, layer):
        start = (r, 0, starts[r]) + (0,) * (layer.ndim - 3)
        return lax.dynamic_update_slice(layer, lax.dynamic_slice_in_dim(rows, r, 1), start)

    return lax.fori_loop(0, rows.shape[0], put, layer)


def write(cache: KVCache, layer: int, k, v, slots) -> KVCache:
    """Place k, v [b,t,k,d] at slots [b,t] of `layer` (slots are checked on the host).

    A row's slots are consecutive (`positions_for` continues them from the row's length), so
    each row is one `dynamic_update_slice` at its first slot, in place in the donated cache.
    The equivalent scatter made XLA copy the layer's K and V several times per decode step.
    """
    starts = slots[:, 0]  # [b]
    out = {}
    for name, x in (("k", k), ("v", v)):
        stored, scale = encode(x, cache.format)  # [b,t,k,d], int8 scales [b,t,k]
        values = getattr(cache, name)[layer]  # [b,k,s,d]
        values = each_row(values, jnp.swapaxes(stored, 1, 2), starts)  # rows [b,k,t,d]
        out[name] = _replace_layer(getattr(cache, name), layer, values)
        if scale is not None:
            scales = getattr(cache, f"{name}_scale")[layer]  # [b,k,s]
            rows = jnp.swapaxes(scale, 1, 2)  # [b,k,t]
            scales = each_row(scales, rows, starts)
            out[f"{name}_scale"] = _replace_layer(getattr(cache, f"{name}_scale"), layer, scales)
    return dataclasses.replace(cache, **out)


@dataclass
class LayerKV:
    """One layer's stored K/V as attention reads them: float32 one key block at a time. The
    cache may hold more rows than the b query rows (`rows`): a server's slots past the ones it
    decodes this step; attention reads rows [0, b) only, and the compiled kernels index rows
    by the query's batch, so the extra rows are never copied."""

    k: jax.Array  # [B,k,s,d] storage dtype, B >= b
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None
    fmt: KVFormat
    rows: int | None = None  # b, the query rows (None: all B)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def window(self, x, lo, n: int):
        """Slots [lo, lo + n) of the first b rows of x [B,k,s,...] -> [b,k,n,...]."""
        if self.rows is None or self.rows == x.shape[0]:
            return lax.dynamic_slice_in_dim(x, lo, n, axis=2)
        starts = (0, 0, lo) + (0,) * (x.ndim - 3)
        return lax.dynamic_slice(x, starts, (self.rows, x.shape[1], n, *x.shape[3:]))

    def keys(self, lo, n: int):
        """Keys of slots [lo, lo + n) as float32 [b,k,n,d] (lo may be traced; n is static)."""
        return self.fmt.widen(self.window(self.k, lo, n))  # -> [b,k,n,d]

    def values(self, lo, n: int):
        return self.fmt.widen(self.window(self.v, lo, n))  # -> [b,k,n,d]

    def key_scales(self, lo, n: int):
        return self.window(self.k_scale, lo, n)  # [B,k,s] -> [b,k,n]

    def value_scales(self, lo, n: int):
        return self.window(self.v_scale, lo, n)  # [B,k,s] -> [b,k,n]


def read(cache: KVCache, layer: int, rows: int | None = None) -> LayerKV:
    """Layer `layer` of the cache as attention reads it, for the first `rows` rows (None: all)."""
    k_scale = cache.k_scale[layer] if cache.k_scale is not None else None
    v_scale = cache.v_scale[layer] if cache.v_scale is not None else None
    fmt = kv_format(cache.format)
    return LayerKV(cache.k[layer], cache.v[layer], k_scale, v_scale, fmt, rows)
