"""Weight formats: how a model's matrices are stored, and the product that reads them.

A weight format is a run setting (`Runtime.weights`), an entry of `WEIGHT_FORMATS`; the JAX
backend has the same table in `jaxbackend/weight_format.py`. Activations and accumulation are
always float32: a stored matrix is widened to float32 right before its product, so the product
of every format equals a float32 matmul on the widened weights (that is the definition, and what
`linear` computes here).

- float32, float16: NumPy arrays of that dtype.
- bfloat16: its bit patterns in uint16 (NumPy has no bfloat16; the KV cache does the same), the
  top half of a float32, so widening is exact.
- int8, int4: symmetric, one scale per output row per group of G input columns, stored in the
  encoding's `scale_dtype`: float32 for int8, float16 for int4 (at int4's 32 columns a float32
  scale is a fifth of the bytes a step reads; float16, as llama.cpp's Q4_0 keeps it, a tenth).
  For one group of values w: amax = max|w|, q = round_half_even(w * (qmax / amax)) in
  [-qmax, qmax] (qmax 127 or 7; -128 and -8 are never produced), scale = amax / qmax (0 when
  amax = 0) rounded to the scale dtype, widened value q * scale. A float16 scale adds at most
  2^-11 of amax to a value's error (the codes' rounding adds up to half a scale); one below
  float16's smallest subnormal (amax < 7 * 2^-25, about 2e-7) is 0 and its group widens to 0,
  one beyond its range (amax > 7 * 65504) is refused. int4 packs two values per byte: byte j
  of a row holds columns 2j (low nibble) and 2j+1 (high nibble), each stored as q + 8 in [1, 15].

Which tensors a format compresses (`WeightFormat.tables`): norms and biases stay float32 (they
are tiny); projections use the format's encoding; the embedding table, the LM head and the
width projections use `tables`, which for int4 is int8, because the LM head decides the token
directly and its error is the one most visible in top-1 agreement (measured in the note of the
issue that added formats; llama.cpp keeps its output matrix wider in Q4_0 for the same reason).

A compressed matrix is a `Compact`: values stored [rows, cols] with rows the outputs, the
quantiser's layout (torch's Linear layout, and the JAX device layout). The reference keeps
float32 linear weights [in, out], so a Compact linear weight is `transposed`: its logical shape
is [cols, rows]. Tables ([v, e]: one row per token) are not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import OptionError
from .quant import from_bf16_bits, to_bf16_bits


@dataclass(frozen=True)
class Encoding:
    """How one matrix is stored: `encode` float32 [rows, cols] -> (stored values, scale or None),
    `widen` (values, scale) -> float32 [rows, cols]."""

    name: str
    storage: type  # NumPy dtype of the stored values
    qmax: int  # largest code of a scaled encoding; 0 for float encodings
    pack: int  # values per stored element
    group: int | None  # default columns per scale (None: the whole row, per-channel)
    encode: Callable
    widen: Callable
    scale_dtype: type = np.float32  # of a scaled encoding's scales

    @property
    def scaled(self) -> bool:
        return self.qmax > 0

    def bytes_for(self, rows: int, cols: int, group: int | None = None) -> int:
        """Bytes of a [rows, cols] matrix in this encoding, with its scales."""
        n = rows * (cols // self.pack) * np.dtype(self.storage).itemsize
        per_scale = np.dtype(self.scale_dtype).itemsize
        return n + (per_scale * rows * (cols // (group or cols)) if self.scaled else 0)


def check_group(cols: int, group: int | None, pack: int = 1) -> int:
    """The group size for rows of `cols` values (None: the whole row); a clear error when it does
    not divide the row or splits a packed byte."""
    g = cols if group is None else group
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise OptionError(f"weight group must be a positive integer, got {group!r}")
    if cols % g or g % pack:
        raise OptionError(
            f"weight group {g} does not divide rows of {cols} values"
            + (f" into whole bytes of {pack} values" if pack > 1 and not cols % g else "")
        )
    return g


def quantize(w, qmax: int, group: int | None = None, scale_dtype=np.float32):
    """w [rows, cols] -> (q [rows, cols] int8 in [-qmax, qmax], scale [rows, cols // G] in
    `scale_dtype`), one scale per row per group of G columns (round half to even, as
    `np.rint`; the scale rounded to its dtype after the codes are made)."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    g = check_group(cols, group)
    grouped = w.reshape(rows, cols // g, g)  # [r, c] -> [r, n, G]
    amax = np.max(np.abs(grouped), axis=-1)  # [r, n]
    wide = amax / np.float32(qmax)  # [r, n] float32
    top = float(np.finfo(scale_dtype).max)
    if wide.size and float(np.max(wide)) > top:
        r, n = np.unravel_index(int(np.argmax(wide)), wide.shape)
        raise OptionError(
            f"a weight of magnitude {float(amax[r, n]):.4g} (row {r}, group {n}) needs a scale"
            f" beyond {np.dtype(scale_dtype).name}'s range (largest {top:.6g}): this model"
            f" cannot be stored in this format"
        )
    safe = np.where(amax > 0, amax, np.float32(1.0))
    inv = np.float32(qmax) / safe  # [r, n]
    q = np.clip(np.rint(grouped * inv[..., None]), -qmax, qmax).astype(np.int8)
    scale = wide.astype(scale_dtype)  # [r, n] as stored: 0 where amax is 0 (or underflows)
    return q.reshape(rows, cols), scale


def dequantize(q, scale):
    """q [rows, cols] and scale [rows, n] (any float dtype) -> float32 [rows, cols] (groups of
    cols / n columns)."""
    rows, cols = q.shape
    grouped = q.astype(np.float32).reshape(rows, scale.shape[1], -1)  # [r, n, G]
    wide = scale.astype(np.float32)[..., None]  # [r, n, 1] (int4's float16 widened)
    grouped *= wide  # [r, n, G] * [r, n, 1], in place: one float copy, not two
    return grouped.reshape(rows, cols)


def pack_int4(q):
    """int4 codes q [rows, cols] in [-7, 7] -> uint8 [rows, cols // 2]: column 2j in the low
    nibble, 2j+1 in the high one, each as q + 8."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed):
    """uint8 [rows, cols // 2] -> int8 codes [rows, cols] (inverse of `pack_int4`)."""
    lo = (packed & 15).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)  # [r, c/2, 2] -> [r, c]


def as_float(w, dtype):
    """w rounded to a float dtype through float32 (the definition), or kept if already it."""
    w = np.asarray(w)
    return w if w.dtype == dtype else np.asarray(w, np.float32).astype(dtype)


def as_bf16_bits(w):
    """w as bfloat16 bit patterns; a bfloat16 source (ml_dtypes, as safetensors returns one)
    keeps its bits without passing through float32."""
    w = np.asarray(w)
    return w.view(np.uint16) if w.dtype.name == "bfloat16" else to_bf16_bits(w.astype(np.float32))


def _float(dtype):
    return Encoding(
        np.dtype(dtype).name,
        dtype,
        0,
        1,
        None,
        lambda w, group=None: (as_float(w, dtype), None),
        lambda values, scale: values.astype(np.float32),
    )


ENCODINGS = {
    enc.name: enc
    for enc in (
        _float(np.float32),
        _float(np.float16),
        Encoding(
            "bfloat16",
            np.uint16,
            0,
            1,
            None,
            lambda w, group=None: (as_bf16_bits(w), None),
            lambda values, scale: from_bf16_bits(values),
        ),
        Encoding(
            "int8",
            np.int8,
            127,
            1,
            None,
            lambda w, group=None: quantize(w, 127, group),
            dequantize,
        ),
        Encoding(
            "int4",
            np.uint8,
            7,
            2,
            32,
            lambda w, group=None: (lambda q, s: (pack_int4(q), s))(
                *quantize(w, 7, group, np.float16)
            ),
            lambda values, scale: dequantize(unpack_int4(values), scale),
            np.float16,
        ),
    )
}


@dataclass(frozen=True)
class WeightFormat:
    """A weight format: the encoding of the projections and of the tables (embedding, LM head,
    width projections). Norms and biases are always float32."""

    name: str
    matrices: Encoding
    tables: Encoding

    @property
    def scaled(self) -> bool:
        """Some of its matrices are quantised (a group size applies)."""
        return self.matrices.scaled or self.tables.scaled


WEIGHT_FORMATS = {
    fmt.name: fmt
    for fmt in (
        WeightFormat("float32", ENCODINGS["float32"], ENCODINGS["float32"]),
        WeightFormat("bfloat16", ENCODINGS["bfloat16"], ENCODINGS["bfloat16"]),
        WeightFormat("float16", ENCODINGS["float16"], ENCODINGS["float16"]),
        WeightFormat("int8", ENCODINGS["int8"], ENCODINGS["int8"]),
        WeightFormat("int4", ENCODINGS["int4"], ENCODINGS["int8"]),
    )
}
WEIGHT_DTYPES = tuple(WEIGHT_FORMATS)

# Params fields stored with the format's `tables` encoding; the other matrices are projections.
TABLES = frozenset({"embed", "pos_embed", "lm_head", "proj_in", "proj_out"})
# Matrices whose reference layout is [in, out] (the transpose of the stored [rows = out, cols]).
TRANSPOSED = frozenset(
    {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head", "proj_in", "proj_out"}
)


def weight_format(name: str) -> WeightFormat:
    if name not in WEIGHT_FORMATS:
        raise OptionError(f"unknown weight format {name!r}: expected one of {WEIGHT_DTYPES}")
    return WEIGHT_FORMATS[name]


@dataclass
class Compact:
    """A matrix in a compact encoding: values [rows, cols // pack] and, when scaled, one scale
    (the encoding's `scale_dtype`) per row per group ([rows, cols // group]). `transposed`: the
    logical matrix is the transpose of the stored one (reference linear weights, [in, out]).
    `pairs`: bfloat16 values [rows / 16, 16 cols] in pair order, each block of 16 rows stored
    column pair by column pair, the block's 16 rows side by side (values[b, 32 j + 2 t + i] is
    row 16 b + t, column 2 j + i): the JAX backend's device layout for its bfloat16 kernel
    (`jaxbackend/params.py`); the reference never makes one."""

    values: np.ndarray
    scale: np.ndarray | None
    encoding: str
    transposed: bool = False
    pairs: bool = False

    @property
    def enc(self) -> Encoding:
        return ENCODINGS[self.encoding]

    @property
    def stored_shape(self) -> tuple[int, int]:
        rows, packed = self.values.shape
        if self.pairs:
            return rows * 16, packed // 16
        return rows, packed * self.enc.pack

    @property
    def shape(self) -> tuple[int, int]:
        """The logical shape (the float32 matrix this stands for)."""
        rows, cols = self.stored_shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (0 if self.scale is None else self.scale.nbytes)


def encoding_of(name: str, fmt: WeightFormat) -> Encoding:
    """The encoding of matrix `name` in format `fmt` (tables and projections may differ)."""
    return fmt.tables if name in TABLES else fmt.matrices


def storage(name: str, shape, fmt: WeightFormat, group: int | None = None):
    """How matrix `name` of logical `shape` is stored in format `fmt`: (its encoding, stored
    [rows = outputs, cols], its group: None unless scaled, checked against the row)."""
    enc = encoding_of(name, fmt)
    rows, cols = shape[::-1] if name in TRANSPOSED else shape  # [in, out] -> stored [out, in]
    if not enc.scaled:
        return enc, rows, cols, None
    group = enc.group if group is None else group
    check_group(cols, group, enc.pack)
    return enc, rows, cols, group


def stored_bytes(name: str, shape, fmt: WeightFormat, group: int | None = None) -> int:
    """Bytes weight `name` of logical `shape` occupies in format `fmt` (vectors: float32), as
    `encode` would store it, without encoding it."""
    if len(shape) == 1:
        return 4 * shape[0]
    enc, rows, cols, group = storage(name, shape, fmt, group)
    return enc.bytes_for(rows, cols, group)


def encode(name: str, w, fmt: WeightFormat, group: int | None = None):
    """One canonical weight (reference layout, any float dtype: a loader passes the checkpoint's
    own, bfloat16 as `ml_dtypes.bfloat16`) in format `fmt`: vectors as float32, float32 matrices
    as plain arrays, every other matrix as a `Compact`. A source already in the stored dtype
    (bfloat16 or float16) keeps its values without passing through float32."""
    w = np.asarray(w)
    if w.ndim != 2:
        return widen(w)
    enc, _, _, group = storage(name, w.shape, fmt, group)
    if enc.name == "float32":
        return widen(w)
    transposed = name in TRANSPOSED
    values, scale = enc.encode(w.T if transposed else w, group)  # [rows = outputs, cols]
    return Compact(np.ascontiguousarray(values), scale, enc.name, transposed)


def widen(w):
    """A weight as float32 in its logical layout (a plain float32 array is returned as is)."""
    if not isinstance(w, Compact):
        return w if w.dtype == np.float32 else w.astype(np.float32)
    full = w.enc.widen(w.values, w.scale)  # [rows, cols]
    return full.T if w.transposed else full


def take_rows(table, ids):
    """Rows `ids` of a table ([v, e] -> [..., e]) as float32, widening only those rows."""
    if not isinstance(table, Compact):
        return widen(table[ids])
    flat = np.asarray(ids).reshape(-1)
    scale = None if table.scale is None else table.scale[flat]
    rows = table.enc.widen(table.values[flat], scale)  # [n, e]
    return rows.reshape(*np.shape(ids), rows.shape[-1])


def encode_params(params, fmt: WeightFormat, group: int | None = None):
    """Params with every weight in format `fmt` (from float weights: re-encoding a quantised
    model would quantise its quantisation error)."""
    for w in iter_weights(params):
        if isinstance(w, Compact) and w.enc.scaled:
            raise OptionError(
                f"weights are already {w.encoding}: load the checkpoint as {fmt.name}"
            )

    def convert(obj):
        changes = {}
        for field in dataclasses.fields(obj):
            w = getattr(obj, field.name)
            if field.name != "layers" and w is not None:
                changes[field.name] = encode(field.name, widen(w), fmt, group)
        return dataclasses.replace(obj, **changes)

    return dataclasses.replace(convert(params), layers=[convert(p) for p in params.layers])


def iter_weights(params):
    """Every weight of a Params (top level, then each layer), absent ones skipped."""
    for obj in (params, *params.layers):
        for field in dataclasses.fields(obj):
            w = getattr(obj, field.name)
            if field.name != "layers" and w is not None:
                yield w


def weight_bytes(params) -> int:
    """Bytes the weights occupy as stored (scales included)."""
    return sum(int(w.nbytes) for w in iter_weights(params))
