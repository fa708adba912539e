"""The reference's Params and LayerParams, registered as JAX pytrees (absent weights are None,
an empty subtree), plus moving weights onto the device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from slimllm.reference.params import LayerParams, Params


def register(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])
    except ValueError:  # already registered (module reloaded)
        pass


register(LayerParams)
register(Params)


def to_device(params: Params, dtype=jnp.float32) -> Params:
    """A copy of NumPy params as device arrays (layers become a tuple: a static-length pytree)."""
    params = dataclasses.replace(params, layers=tuple(params.layers))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
