"""The KV cache write as a compiled kernel (`src/cache.cc`): each row's new entries copied into
its consecutive slots of a cache layer, in place (the result aliases the layer).

`write_rows(layer, rows, starts)` returns None where the kernels are off or missing, and the
caller (`jaxbackend/kv_cache.each_row`) takes the XLA path: one `dynamic_update_slice` per row
in a loop, which XLA runs a few microseconds an iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import active, target


def write_rows(layer, rows, starts):
    """layer [B,k,s,...] with rows[r] [k,t,...] written from slot starts[r] (r < b = rows'
    first dimension, b <= B), or None where the kernel does not apply."""
    if not active():
        return None
    call = jax.ffi.ffi_call(
        target("slimllm_write_rows"),
        jax.ShapeDtypeStruct(layer.shape, layer.dtype),
        vmap_method="sequential",
        input_output_aliases={0: 0},
    )
    return call(layer, rows.astype(layer.dtype), starts.astype(jnp.int32))
