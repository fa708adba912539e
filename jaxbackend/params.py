"""The reference's Params and LayerParams, registered as JAX pytrees (absent weights are None,
an empty subtree), plus moving weights onto the device in the backend's layout.

Device layout: every linear weight is stored transposed, [out, in], and `ops.linear` contracts
its last axis (y = x @ w.T). The reference keeps [in, out]. On XLA:CPU a matrix-vector product
streams an [out, in] matrix faster (one dot product per contiguous row): measured on the 150M
preset's shapes, 17.7 GB/s against 15.6 GB/s for the eight layers and the head in one program,
and no slower for prefill-sized matrix products. Decode at batch 1 is bound by exactly this read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.reference.params import LayerParams, Params

# Weights used as `linear(x, w)`: [in, out] in the reference, [out, in] on the device.
LINEAR = frozenset(
    {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "proj_in", "proj_out", "lm_head"}
)


def register(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])
    except ValueError:  # already registered (module reloaded)
        pass


register(LayerParams)
register(Params)


def device_array(name: str, a, dtype=jnp.float32):
    """One reference weight as the device stores it (linear weights transposed to [out, in])."""
    if a is None:
        return None
    if name in LINEAR:
        a = np.ascontiguousarray(np.asarray(a).T)
    return jnp.asarray(a, dtype)


def layer_to_device(layer: LayerParams, dtype=jnp.float32) -> LayerParams:
    names = [f.name for f in dataclasses.fields(layer)]
    return LayerParams(**{name: device_array(name, getattr(layer, name), dtype) for name in names})


def to_device(params: Params, dtype=jnp.float32) -> Params:
    """A copy of NumPy params as device arrays in the device layout (layers become a tuple: a
    static-length pytree)."""
    top = {
        f.name: device_array(f.name, getattr(params, f.name), dtype)
        for f in dataclasses.fields(params)
        if f.name != "layers"
    }
    return Params(layers=tuple(layer_to_device(layer, dtype) for layer in params.layers), **top)
