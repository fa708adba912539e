"""ModelConfig validates every field by type and range, whichever loader (Hugging Face, llama2.c,
the API's demo) builds it: a bad value is a ConfigError naming the field, never a config that
divides by zero or silently computes nonsense later."""

import math

import pytest

from slimllm.reference.config import DynamicNTK, ModelConfig, WavelengthScaling
from slimllm.reference.errors import ConfigError, SlimllmError

BASE = ModelConfig(
    vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=48, max_len=64
)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"n_heads": 0}, "n_heads=0"),
        ({"n_kv_heads": 0}, "n_kv_heads=0"),
        ({"n_kv_heads": 8}, "n_kv_heads=8"),  # more kv heads than query heads
        ({"width": 32.0}, "width=32.0"),  # a float is not a size
        ({"vocab": "64"}, "vocab='64'"),
        ({"n_layers": True}, "n_layers=True"),  # a bool is not an int
        ({"n_layers": 10**9}, "n_layers=1000000000"),  # would name 10^9 layers
        ({"ffn_width": 2**40}, "ffn_width="),
        ({"max_len": -1}, "max_len=-1"),
        ({"norm_eps": -1.0}, "norm_eps=-1.0"),  # token 0 forever
        ({"norm_eps": 0.0}, "norm_eps=0.0"),
        ({"norm_eps": math.nan}, "norm_eps=nan"),
        ({"rope_theta": math.inf}, "rope_theta=inf"),
        ({"rope_theta": 10**400}, "rope_theta=1000"),  # too large for a float: no OverflowError
        ({"rope_theta": 1.0}, "rope_theta=1.0"),  # every wavelength the same
        ({"rope_fraction": 1.5}, "rope_fraction=1.5"),
        ({"rope_fraction": 0.1}, "rotary dim 0"),  # nothing rotated
        ({"residual_alpha": -2.0}, "residual_alpha=-2.0"),
        ({"qkv_bias": 1}, "qkv_bias=1"),
        ({"tied_head": "false"}, "tied_head='false'"),
        ({"logn_len": -4}, "logn_len=-4"),
        ({"block_start_id": 64}, "block_start_id=64"),  # outside the vocabulary
        ({"block_anchor_ids": [1]}, "block_anchor_ids=[1]"),
        ({"block_anchor_ids": (1, -2)}, "block_anchor_ids[]=-2"),
        ({"norm": 3}, "norm=3"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_a_field_of_the_wrong_type_or_out_of_range_is_named(changes, words):
    with pytest.raises(ConfigError, match=r"^ModelConfig\.|rotary dim") as e:
        BASE.replace(**changes)
    assert words in str(e.value) and isinstance(e.value, SlimllmError)


@pytest.mark.parametrize(
    "scaling, words",
    [
        (lambda: WavelengthScaling(0.0, 1.0, 4.0, 16), "factor=0.0"),
        (lambda: WavelengthScaling(8.0, 4.0, 4.0, 16), "more than low_freq_factor"),  # 0/0
        (lambda: WavelengthScaling(8.0, 1.0, 4.0, 16.5), "original_len=16.5"),
        (lambda: DynamicNTK(0), "trained_len=0"),
    ],
    ids=["factor", "equal-bands", "float-len", "ntk-zero"],
)
def test_rope_scalings_are_checked(scaling, words):
    with pytest.raises(ConfigError, match=words):
        scaling()


def test_values_at_the_edges_of_their_ranges_are_accepted():
    edge = BASE.replace(
        norm_eps=1.0, rope_fraction=0.25, block_start_id=63, block_anchor_ids=(0, 63), n_layers=1
    )
    assert edge.rotary_dim == 2 and edge.prefix_lm
    assert BASE.replace(vocab=2**31 - 1, rope_theta=1e30).vocab == 2**31 - 1
