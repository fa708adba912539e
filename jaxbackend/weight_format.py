"""Weight formats in JAX: the reference's `weight_format.py` table with jnp widening, and the
product that reads a compact matrix.

The reference's `Compact` is registered as a pytree (values and scale are leaves, the encoding
and orientation static), so a compact weight sits in the device Params like any array. On the
device every linear weight is [rows = out, cols = in] (`params.py`), the quantiser's layout, so a
device Compact is never transposed.

How the product reads a compact matrix. Widening a whole matrix and then multiplying lets XLA
fuse the conversion into its dot at batch 1 but falls off a cliff at batch 4 and at large shapes;
widening one tile of TILE_ROWS output rows at a time under `lax.scan` and multiplying it in
float32 keeps every batch on the float32 dot, and never builds a float copy of a matrix (a tile
is TILE_ROWS x cols float32: 1 MiB for 1024 columns). How the tile meets the dot matters more
than its size: written transposed ([in, t], `x @ tile.T`) it is fastest up to a few thousand
columns, contracted on its last axis beyond (the transposed write of 4096+ columns is 4-6x
slower), hence TRANSPOSED_TILE_COLS. Measured with `slimllm bench products` (2 cores, batch 1,
ms for all matrices, float32 / bfloat16 / int8): the 150M preset's 33 matrices 21-26 / 22-30 /
16-21; one Llama-3-8B layer 44-46 / 63-76 / 55-61 (float32 reads 2-4x the bytes). bfloat16
and int8 therefore decode at about float32's speed, not at their own bandwidth floor, and int4's
unpacking is slow in XLA (5x float32 at the 150M shapes): the speed issue replaces these
products with kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from slimllm.reference.weight_format import ENCODINGS, Compact

TILE_ROWS = 256  # output rows widened per scan step (128 and 512 were no faster)
TRANSPOSED_TILE_COLS = 3072  # widest tile written transposed (above the 150M preset's 2816)

try:
    jax.tree_util.register_dataclass(
        Compact, data_fields=["values", "scale"], meta_fields=["encoding", "transposed", "pairs"]
    )
except ValueError:  # already registered (module reloaded)
    pass


def dequantize(q, scale):
    """q [rows, cols] and scale [rows, n] (float32, or int4's float16) -> float32 [rows, cols]
    (groups of cols / n columns)."""
    rows, cols = q.shape
    grouped = q.astype(jnp.float32).reshape(rows, scale.shape[1], -1)  # [r, n, G]
    wide = scale.astype(jnp.float32)[..., None]  # [r, n, 1]
    return (grouped * wide).reshape(rows, cols)


def unpack_int4(packed):
    """uint8 [rows, cols // 2] -> int8 codes [rows, cols]: low nibble column 2j, high 2j+1."""
    lo = (packed & 15).astype(jnp.int8) - 8
    hi = (packed >> 4).astype(jnp.int8) - 8
    return jnp.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)  # [r, c/2, 2] -> [r, c]


def from_bf16_bits(bits):
    """bfloat16 bit patterns (uint16) -> float32, exactly, with integer ops (XLA:CPU converts
    these fast; its bf16 arithmetic is slow)."""
    return lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


PAIR_ROWS = 16  # rows of a block in pair order (`Compact.pairs`): one vector of 32-bit lanes


def to_pair_order(values):
    """[rows, cols] -> [rows / 16, 16 cols] in pair order (`Compact.pairs`); NumPy or jnp."""
    rows, cols = values.shape
    blocks = values.reshape(rows // PAIR_ROWS, PAIR_ROWS, cols // 2, 2)  # [b, t, j, i]
    return blocks.transpose(0, 2, 1, 3).reshape(rows // PAIR_ROWS, PAIR_ROWS * cols)


def from_pair_order(values):
    """The inverse of `to_pair_order`: [rows / 16, 16 cols] -> [rows, cols]."""
    blocks, width = values.shape
    cols = width // PAIR_ROWS
    pairs = values.reshape(blocks, cols // 2, PAIR_ROWS, 2)  # [b, j, t, i]
    return pairs.transpose(0, 2, 1, 3).reshape(blocks * PAIR_ROWS, cols)


# name -> widen(values, scale) -> float32 [rows, cols]; the encodings of the reference's table.
WIDEN = {
    "float32": lambda values, scale: values,
    "float16": lambda values, scale: values.astype(jnp.float32),
    "bfloat16": lambda values, scale: from_bf16_bits(values),
    "int8": dequantize,
    "int4": lambda values, scale: dequantize(unpack_int4(values), scale),
}
assert set(WIDEN) == set(ENCODINGS), "one widening per reference encoding"


def widen(w):
    """A weight as float32 (a whole matrix: for tables and tests; products use `linear`)."""
    if not isinstance(w, Compact):
        return w.astype(jnp.float32)
    return WIDEN[w.encoding](from_pair_order(w.values) if w.pairs else w.values, w.scale)


def compact_linear(x, w: Compact):
    """x @ widen(w).T for a compact device weight [out, in]: [..., in] -> [..., out], widened one
    tile of TILE_ROWS output rows at a time (module docstring). When the tiles do not divide the
    rows, the last tile starts earlier and overlaps the one before it (those rows are kept
    once), so no weight is ever padded or copied. Values in pair order are sliced by blocks of
    16 rows (every tile's start is a multiple of 16 then) and put back in rows per tile."""
    rows, cols = w.stored_shape[0], x.shape[-1]
    t = min(TILE_ROWS, rows)
    n = -(-rows // t)  # tiles
    flat = x.reshape(-1, x.shape[-1])  # [m, in]
    widen_tile = WIDEN[w.encoding]

    def step(carry, i):
        start = jnp.minimum(i * t, rows - t)
        if w.pairs:  # bfloat16: no scales
            block = lax.dynamic_slice_in_dim(w.values, start // PAIR_ROWS, t // PAIR_ROWS)
            tile = (from_pair_order(block), None)
        else:
            tile = jax.tree_util.tree_map(
                lambda a: lax.dynamic_slice_in_dim(a, start, t), (w.values, w.scale)
            )  # [t, ...] of the values and the scales
        wide = widen_tile(*tile)  # [t, in] float32
        if cols <= TRANSPOSED_TILE_COLS:  # the widened tile is written as [in, t]
            return carry, flat @ wide.T  # [m, in] x [in, t] -> [m, t]
        return carry, lax.dot_general(flat, wide, (((1,), (1,)), ((), ())))  # -> [m, t]

    _, ys = lax.scan(step, None, jnp.arange(n))  # [n, m, t]
    last = rows - (n - 1) * t  # rows only the last tile holds
    y = jnp.concatenate(
        [jnp.moveaxis(ys[:-1], 0, 1).reshape(flat.shape[0], -1), ys[-1][:, t - last :]], axis=1
    )  # [m, rows]
    return y.reshape(*x.shape[:-1], rows)


def take_rows(table, ids):
    """Rows `ids` of a table [v, e] as float32: [...] -> [..., e], widening only those rows."""
    if not isinstance(table, Compact):
        return table[ids].astype(jnp.float32)
    assert not table.pairs, "tables keep their rows (params.py never puts them in pair order)"
    scale = None if table.scale is None else table.scale[ids.reshape(-1)]
    rows = WIDEN[table.encoding](table.values[ids.reshape(-1)], scale)  # [n, e]
    return rows.reshape(*ids.shape, rows.shape[-1])
