"""The weight formats' definition (reference/weight_format.py) on hand-computed vectors: the
quantiser's rounding and ties, zero groups, packing, orientation, and clear errors."""

import numpy as np
import pytest

from slimllm.reference import weight_format as wf
from slimllm.reference.config import ModelConfig
from slimllm.reference.ops import linear
from slimllm.reference.params import check_params, init_params


def test_int8_rounds_half_to_even_and_never_makes_minus_128():
    # amax 127: the codes are the values themselves, rounded; ties go to the even neighbour
    w = np.array([[0.5, 1.5, 2.5, 127.0], [-0.5, -1.5, -2.5, -127.0]], np.float32)
    q, scale = wf.quantize(w, 127)
    assert q.tolist() == [[0, 2, 2, 127], [0, -2, -2, -127]]
    assert scale.tolist() == [[1.0], [1.0]]
    q, _ = wf.quantize(np.array([[1.0, -2.0, 0.5, 0.0]], np.float32), 127)
    assert q.tolist() == [[64, -127, 32, 0]]  # 63.5 -> 64 (even), 31.75 -> 32


def test_groups_have_their_own_scale_and_zero_groups_widen_to_zero():
    w = np.array([[4.0, -2.0, 0.0, 0.0, 1.0, 0.25]], np.float32)
    q, scale = wf.quantize(w, 7, group=2)
    assert np.array_equal(scale, np.float32([[4, 0, 1]]) / np.float32(7))
    assert q.tolist() == [[7, -4, 0, 0, 7, 2]]  # -3.5 -> -4 (even), 1.75 -> 2
    assert np.array_equal(wf.dequantize(q, scale)[0, 2:4], [0.0, 0.0])


def test_int4_scales_are_float16_rounded_after_the_codes():
    """int4 keeps its scales in float16 (as llama.cpp's Q4_0): the codes are the float32
    definition's, the scale amax / 7 rounded to float16; int8 keeps float32 scales."""
    w = np.array([[1.0, -0.5, 0.25, 0.0], [3e-4, 1e-4, 0.0, -2e-4], [1e-7, 0.0, 0.0, 0.0]])
    stored = wf.encode("wq", w.T, wf.weight_format("int4"), 4)
    assert stored.scale.dtype == np.float16 and stored.scale.shape == (3, 1)
    q = wf.unpack_int4(stored.values)
    assert q.tolist() == [[7, -4, 2, 0], [7, 2, 0, -5], [7, 0, 0, 0]]  # -3.5 -> -4, 4.67 -> 5
    wide = np.float32([1.0, 3e-4, 1e-7]) / np.float32(7)
    assert np.array_equal(stored.scale[:, 0], wide.astype(np.float16))
    assert stored.scale[0, 0] == np.float16(0.142822265625)  # 1 / 7 to float16's 11 bits
    assert stored.scale[1, 0] != 0 and stored.scale[2, 0] == 0  # subnormal kept, 1.4e-8 is 0
    back = wf.widen(stored).T
    assert np.array_equal(back, q * stored.scale.astype(np.float32))
    assert not back[2].any()  # a group below float16's smallest subnormal widens to 0
    assert wf.ENCODINGS["int8"].scale_dtype == np.float32
    assert wf.encode("wq", w.T, wf.weight_format("int8")).scale.dtype == np.float32
    # bytes: half a byte a value and 2 a scale (Q4_0's 18 bytes per 32 values)
    assert wf.ENCODINGS["int4"].bytes_for(64, 1024, 32) == 64 * 512 + 2 * 64 * 32
    assert wf.stored_bytes("wq", (1024, 64), wf.weight_format("int4")) == 64 * (512 + 64)


def test_a_scale_beyond_float16_is_refused_naming_the_weight():
    w = np.zeros((2, 64), np.float32)
    w[1, 40] = 7 * 65504 * 1.01
    with pytest.raises(ValueError, match=r"magnitude 4\.631e\+05 \(row 1, group 1\) .* float16"):
        wf.encode("w_up", w.T, wf.weight_format("int4"))
    int8 = wf.widen(wf.encode("w_up", w.T, wf.weight_format("int8")))  # float32 scales hold it
    assert np.isclose(int8[40, 1], w[1, 40], rtol=1e-6)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    q = np.array([[4, 0, -7, 2]], np.int8)
    packed = wf.pack_int4(q)
    assert packed.dtype == np.uint8 and packed.tolist() == [[12 | 8 << 4, 1 | 10 << 4]]
    codes = np.arange(-7, 8, dtype=np.int8)
    every = np.stack(np.meshgrid(codes, codes), -1).reshape(1, -1)  # every pair of codes
    assert np.array_equal(wf.unpack_int4(wf.pack_int4(every)), every)


@pytest.mark.parametrize(
    ("cols", "group", "message"),
    [
        (6, 4, "weight group 4 does not divide rows of 6 values"),
        (6, 3, "into whole bytes of 2 values"),
        (6, 0, "weight group must be a positive integer"),
    ],
)
def test_a_group_that_does_not_fit_the_row_is_a_clear_error(cols, group, message):
    w = np.ones((3, cols), np.float32)
    with pytest.raises(ValueError, match=message):
        wf.encode("wq", w.T, wf.weight_format("int4"), group)


@pytest.mark.parametrize("name", wf.WEIGHT_DTYPES)
def test_every_format_keeps_the_logical_shape_and_widens_close_to_the_weights(name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 12)).astype(np.float32)  # a linear weight [in, out]
    stored = wf.encode("wq", w, wf.weight_format(name), 32 if name == "int4" else None)
    assert stored.shape == w.shape
    back = wf.widen(stored)
    assert back.dtype == np.float32 and back.shape == w.shape
    # error bounds: half a quantisation step of each group, or the float format's rounding
    step = {"int8": 1 / 127, "int4": 1 / 7}.get(name, 0.0)
    # the float formats' rounding, or int4's float16 scale (q * its rounding <= amax * 2^-11)
    ulp = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11, "int4": 2.0**-11}.get(
        name, 0.0
    )
    amax = np.abs(w).max()
    assert np.abs(back - w).max() <= amax * (step / 2 + ulp) * (1 + 1e-6)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert np.array_equal(linear(x, stored), x @ back)  # the product is the widened matmul


def test_bfloat16_and_float16_store_half_the_bytes_and_widen_exactly():
    w = np.array([[1.0, -2.5], [0.15625, 3.0]], np.float32)  # representable in both
    for name in ("bfloat16", "float16"):
        stored = wf.encode("embed", w, wf.weight_format(name))
        assert stored.values.nbytes == w.nbytes // 2
        assert np.array_equal(wf.widen(stored), w)


def test_tables_rows_widen_alone_and_int4_keeps_tables_in_int8():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 8)).astype(np.float32)
    stored = wf.encode("embed", table, wf.weight_format("int4"), 4)
    assert stored.encoding == "int8" and not stored.transposed
    ids = np.array([[3, 3, 9]])
    assert np.array_equal(wf.take_rows(stored, ids), wf.widen(stored)[ids])
    assert wf.encode("wq", table.T, wf.weight_format("int4"), 4).encoding == "int4"


def test_encoded_params_pass_the_shape_check_and_cannot_be_quantised_twice():
    cfg = ModelConfig(vocab=64, width=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_width=64, max_len=16)  # fmt: skip
    params = init_params(cfg)
    q = wf.encode_params(params, wf.weight_format("int4"))
    check_params(q, cfg)
    assert wf.weight_bytes(q) < wf.weight_bytes(params) / 4
    with pytest.raises(ValueError, match="already int8"):
        wf.encode_params(q, wf.weight_format("int8"))
    b16 = wf.encode_params(params, wf.weight_format("bfloat16"))
    assert wf.weight_bytes(wf.encode_params(b16, wf.weight_format("int8"))) == wf.weight_bytes(
        wf.encode_params(params, wf.weight_format("int8"))
    )
