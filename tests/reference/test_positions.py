import math

import numpy as np
import pytest

from slimllm.reference import positions
from slimllm.reference.config import ModelConfig, WavelengthScaling
from slimllm.weights.transforms import hf_rope_permute

CFG = ModelConfig(
    vocab=16, width=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_width=8, max_len=64
)


def at(cfg, t: int, start: int = 0):
    """Positions of t tokens of one plain sequence after `start` cached ones."""
    return positions.positions_for(
        cfg, positions.advance(positions.start_state(cfg, [[0]]), start), t
    )


def test_rotation_preserves_norm_and_position_zero_is_identity():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 2, 16)).astype(np.float32)
    pos = at(CFG, 5)
    y = positions.apply_rope(x, CFG, pos)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)


def test_rope_half_by_hand():
    """d=4, position 1: pair (x0, x2) turns by theta^0 = 1 rad, pair (x1, x3) by theta^-1/2."""
    cfg = CFG.replace(head_dim=4, width=8, rope_theta=100.0)
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 1, 1, 4)
    pos = at(cfg, 1, start=1)
    y = positions.apply_rope(x, cfg, pos).ravel()
    a, b = 1.0, 0.1
    want = [
        1 * math.cos(a) - 3 * math.sin(a),
        2 * math.cos(b) - 4 * math.sin(b),
        3 * math.cos(a) + 1 * math.sin(a),
        4 * math.cos(b) + 2 * math.sin(b),
    ]
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_interleaved_rope_equals_half_rope_on_permuted_weights():
    """The HF conversion permutation turns interleaved-pair weights into rotate-half ones."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 2 * 16)).astype(np.float32)  # [e, h*d]
    x = rng.standard_normal((1, 4, 32)).astype(np.float32)
    pos = at(CFG, 4, start=3)
    inter = positions.apply_rope(
        (x @ w).reshape(1, 4, 2, 16), CFG.replace(rope_style="interleaved"), pos
    )
    half = positions.apply_rope((x @ hf_rope_permute(w, CFG, 2)).reshape(1, 4, 2, 16), CFG, pos)
    # same vectors up to the fixed reordering of dims within each head
    perm = hf_rope_permute(np.eye(16, dtype=np.float32), CFG.replace(), 1).argmax(0)
    np.testing.assert_allclose(half, inter[..., perm], rtol=1e-5, atol=1e-6)


def test_partial_rotation_leaves_the_tail():
    cfg = CFG.replace(rope_fraction=0.5)
    x = np.random.default_rng(2).standard_normal((1, 3, 2, 16)).astype(np.float32)
    y = positions.apply_rope(x, cfg, at(cfg, 3, start=2))
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])
    assert not np.allclose(y[..., :8], x[..., :8])


def test_wavelength_scaling_bands():
    """Short wavelengths unchanged, long ones divided by factor, the band between smoothed."""
    freqs = np.array([1.0, 0.1, 0.02, 0.001], np.float32)  # wavelengths 6.3, 63, 314, 6283
    scaling = WavelengthScaling(8.0, 1.0, 4.0, 512)  # cut-offs 128 and 512
    out = positions.wavelength_scale(freqs, scaling)
    assert out[0] == freqs[0] and out[1] == freqs[1]
    assert out[3] == pytest.approx(freqs[3] / 8)
    smooth = (512 / (2 * np.pi / 0.02) - 1) / 3
    assert out[2] == pytest.approx((1 - smooth) * 0.02 / 8 + smooth * 0.02, rel=1e-6)


def test_alibi_slopes_power_of_two_and_not():
    np.testing.assert_allclose(positions.alibi_slopes(4), [2**-2, 2**-4, 2**-6, 2**-8])
    # 6 heads: p = 4 -> 4 slopes as above, then 2^(-8*1/8), 2^(-8*3/8)
    np.testing.assert_allclose(
        positions.alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    )


def test_ntk_alpha():
    assert positions.ntk_alpha(8, 8) == 1.0
    assert positions.ntk_alpha(12, 8) == 3.0  # ceil(log2(1.5) + 1) = 2 -> 2^2 - 1
    assert positions.ntk_alpha(24, 8) == 7.0
    assert positions.ntk_alpha(3, 8) == 1.0


def test_logn_scale():
    cfg = CFG.replace(logn_len=4)
    pos = at(cfg, 6)
    np.testing.assert_allclose(
        positions.logn_scale(cfg, pos)[0], [1, 1, 1, 1, math.log(5, 4), math.log(6, 4)], rtol=1e-6
    )


def test_rope2d_positions_and_prefix():
    cfg = CFG.replace(pos="rope2d", block_start_id=9, block_anchor_ids=(7, 8))
    prompt = [3, 4, 8, 9]  # ..., [gMASK]=8 at index 2, <sop>=9 at index 3
    state = positions.start_state(cfg, [prompt])
    assert state.prefix[0] == 3 and state.anchor[0] == 2
    pos = positions.positions_for(cfg, state, 4)
    np.testing.assert_array_equal(pos.ids[0], [[0, 0], [1, 0], [2, 0], [2, 1]])
    later = positions.positions_for(cfg, positions.advance(state, 4), 1)
    np.testing.assert_array_equal(later.ids[0], [[2, 2]])
    with pytest.raises(ValueError, match="block start token 9"):
        positions.start_state(cfg, [[3, 4, 8]])
