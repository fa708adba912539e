"""The reference's Params and LayerParams, registered as JAX pytrees (absent weights are None,
an empty subtree), plus moving weights onto the device in the backend's layout.

Device layout (decode at batch 1 is bound by reading the weights, and these choices read them
faster on XLA:CPU; measured on the 150M preset's shapes, the eight layers and the head in one
program: 15.6 GB/s as the reference stores them, 17.7 GB/s transposed, 18.9 GB/s also fused):
- every linear weight is stored transposed, [out, in], and `ops.linear` contracts its last axis
  (y = x @ w.T): a matrix-vector product streams contiguous rows. The reference keeps [in, out].
- the q, k and v projections are one matrix `w_qkv`, and SwiGLU's gate and up projections one
  matrix `w_gate_up` (`DeviceLayer`): one larger product instead of two or three small ones.
  For tensor parallelism over R ranks the fused rows are rank-major ([q_r; k_r; v_r] for each
  rank r in turn), so that splitting the rows evenly gives every rank its own heads/columns.
- for the bfloat16 kernel (`pairs`: kernels "fast" on a CPU with AVX512-BF16 and no AMX),
  bfloat16 linear weights are stored in pair order (`Compact.pairs`): the kernel reads them as
  they lie at any batch, where rows would be copied into that order on every prefill call, or
  multiplied as dot products that a batch of 16 reuses less (bench/README.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.reference.params import LayerParams, Params
from slimllm.reference.weight_format import TRANSPOSED, Compact

from .weight_format import PAIR_ROWS, to_pair_order

# Weights used as `linear(x, w)`: [in, out] in the reference, [out, in] on the device.
LINEAR = TRANSPOSED | {"w_qkv", "w_gate_up"}  # the fused ones: device layout only


def register(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])
    except ValueError:  # already registered (module reloaded)
        pass


@dataclass
class DeviceLayer(LayerParams):
    """A layer in the device layout: wq/wk/wv (and w_gate/w_up) are None, fused below."""

    w_qkv: jax.Array | None = None  # [(h + 2k) d, e], rank-major under tensor parallelism
    w_gate_up: jax.Array | None = None  # [2f, e] (swiglu), rank-major likewise


register(LayerParams)
register(DeviceLayer)
register(Params)


def host_layout(name: str, a):
    """One reference weight in the device layout, still on the host (linear weights transposed
    to [out, in]; a Compact is stored [out, in] or as a table already; absent weights stay
    None)."""
    if isinstance(a, Compact):
        return Compact(a.values, a.scale, a.encoding)
    return np.asarray(a).T if a is not None and name in LINEAR else a


def to_jax(a, dtype=jnp.float32):
    """A host weight (array or Compact, in the device layout) as device arrays."""
    if a is None or not isinstance(a, Compact):
        return None if a is None else jnp.asarray(a, dtype)
    scale = None if a.scale is None else jnp.asarray(a.scale)
    return Compact(jnp.asarray(a.values), scale, a.encoding, pairs=a.pairs)


def in_pair_order(name: str, a, ranks: int = 1):
    """A host bfloat16 linear weight in the device layout, in pair order (`Compact.pairs`) where
    each of `ranks` even slices of its rows or of its columns keeps whole blocks of 16 rows and
    32-column steps (the kernel's); any other weight as it is."""
    if not (isinstance(a, Compact) and a.encoding == "bfloat16" and name in LINEAR):
        return a
    rows, cols = a.stored_shape
    if rows % (PAIR_ROWS * ranks) or cols % (2 * PAIR_ROWS * ranks):
        return a
    return Compact(to_pair_order(a.values), None, a.encoding, pairs=True)


def device_array(name: str, a, dtype=jnp.float32):
    """One reference weight as the device stores it."""
    return to_jax(host_layout(name, a), dtype)


def fuse_rows(parts: list, ranks: int):
    """Stack [out_i, in] matrices by rows, rank-major: each part's rows are cut into `ranks`
    equal pieces, and rank r's pieces of every part come together, r = 0, 1, ... (a Compact's
    values and scales alike)."""
    if isinstance(parts[0], Compact):
        scale = None if parts[0].scale is None else fuse_rows([p.scale for p in parts], ranks)
        return Compact(fuse_rows([p.values for p in parts], ranks), scale, parts[0].encoding)
    pieces = [np.split(part, ranks, axis=0) for part in parts]
    return np.concatenate([piece[r] for r in range(ranks) for piece in pieces], axis=0)


def layer_to_device(
    layer: LayerParams, dtype=jnp.float32, ranks: int = 1, pairs: bool = False
) -> DeviceLayer:
    """One reference layer in the device layout (`ranks`: the tensor-parallel ranks the fused
    matrices will be split over, evenly by rows; `pairs`: bfloat16 in pair order)."""
    host = {f.name: host_layout(f.name, getattr(layer, f.name)) for f in dataclasses.fields(layer)}
    host["w_qkv"] = fuse_rows([host.pop("wq"), host.pop("wk"), host.pop("wv")], ranks)
    if host["w_gate"] is not None:  # swiglu (the other MLPs have only w_up)
        host["w_gate_up"] = fuse_rows([host.pop("w_gate"), host.pop("w_up")], ranks)
    if pairs:
        host = {name: in_pair_order(name, a, ranks) for name, a in host.items()}
    arrays = {name: to_jax(a, dtype) for name, a in host.items()}
    return DeviceLayer(**(dict.fromkeys(("wq", "wk", "wv", "w_gate", "w_up")) | arrays))


def to_device(
    params: Params,
    dtype=jnp.float32,
    ranks: int = 1,
    consume: bool = False,
    pairs: bool = False,
) -> Params:
    """A copy of NumPy params as device arrays in the device layout (layers become a tuple: a
    static-length pytree), bfloat16 linear weights in pair order with `pairs`. With `consume`,
    each host weight is dropped from `params` as soon as its device copy exists, so placing a
    model never holds two copies of it (the caller gives the host weights up: an 8B model in
    bf16 is 16 GB either way)."""
    top = {}
    for f in dataclasses.fields(params):
        if f.name != "layers":
            host = host_layout(f.name, getattr(params, f.name))
            top[f.name] = to_jax(in_pair_order(f.name, host, ranks) if pairs else host, dtype)
            if consume:
                setattr(params, f.name, None)
    layers = []
    for i, layer in enumerate(params.layers):
        layers.append(layer_to_device(layer, dtype, ranks, pairs))
        if consume:
            params.layers[i] = None
    return Params(layers=tuple(layers), **top)
