"""RoPE's cos and sin in compiled programs: looked up in tables made on the host, not computed per
element (`jaxbackend/positions.py`, `rope_tables`).

XLA:CPU fused cos and sin into each rotation and evaluated them for every element of q and k
(0.13 ms a layer of a batch-16 decode step of the 156M shape). Inside `rope_tables` the angles
are the reference's values exactly, a compiled forward of a RoPE model holds no cosine or sine,
and dynamic NTK (angles that follow each row's alpha) and caches whose tables would pass
TABLE_LIMIT entries (constants of the program) still compute theirs. Read from the compiled
HLO, not timed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slimllm.jaxbackend import positions as jax_positions
from slimllm.jaxbackend.engine import Engine
from slimllm.jaxbackend.model import forward
from slimllm.jaxbackend.positions import device_state
from slimllm.reference import positions as ref_positions
from slimllm.reference.config import DynamicNTK, ModelConfig, WavelengthScaling
from slimllm.reference.params import init_params
from slimllm.reference.positions import SeqState

LENGTH = 48  # the cache's slots: the table's positions
BASE = ModelConfig(
    vocab=64, width=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_width=64, max_len=64
)
CONFIGS = {
    "half": BASE,
    "interleaved, float16 frequencies": dataclasses.replace(
        BASE, rope_style="interleaved", rope_f16_freqs=True, rope_theta=500000.0
    ),
    "partial, wavelength scaling": dataclasses.replace(
        BASE, rope_fraction=0.5, rope_scaling=WavelengthScaling(8.0, 1.0, 4.0, 16)
    ),
    "rope2d": dataclasses.replace(BASE, pos="rope2d", block_start_id=5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_looked_up_angles_are_the_references(name):
    cfg = CONFIGS[name]
    ids = np.random.default_rng(0).integers(0, LENGTH, (3, 5))  # [b,t]
    ones = np.ones(3, np.float32)
    want_cos, want_sin = ref_positions.rope_angles(cfg, ids, ones)
    with jax_positions.rope_tables(LENGTH):
        cos, sin = jax.jit(lambda i: jax_positions.rope_angles(cfg, i, jnp.asarray(ones)))(ids)
    np.testing.assert_array_equal(np.asarray(cos), want_cos)
    np.testing.assert_array_equal(np.asarray(sin), want_sin)
    computed = jax_positions.rope_angles(cfg, jnp.asarray(ids), jnp.asarray(ones))  # no tables
    np.testing.assert_allclose(np.asarray(computed[0]), want_cos, atol=1e-5)
    np.testing.assert_allclose(np.asarray(computed[1]), want_sin, atol=1e-5)


def test_an_id_past_the_table_reads_nan_not_a_neighbour():
    with jax_positions.rope_tables(LENGTH):
        cos, sin = jax_positions.rope_angles(BASE, jnp.asarray([[LENGTH]]), jnp.ones(1))
    assert np.isnan(np.asarray(cos)).all() and np.isnan(np.asarray(sin)).all()


def transcendentals(cfg: ModelConfig, length: int = LENGTH) -> int:
    """cosine and sine ops in the compiled forward of 4 tokens of a 2-row batch."""
    engine = Engine(init_params(cfg, 0), cfg)
    cache = engine.new_cache(2, length, "float32")
    zeros = np.zeros(2, int)
    state = device_state(SeqState(np.asarray([3, 7]), zeros, zeros, np.ones(2, np.float32)))
    tokens = jnp.ones((2, 4), jnp.int32)
    program = jax.jit(lambda p, x, c, s: forward(p, cfg, x, c, s))
    hlo = program.lower(engine.params, tokens, cache, state).compile().as_text()
    return hlo.count(" cosine(") + hlo.count(" sine(")


@pytest.mark.parametrize("name", ["half", "rope2d"])
def test_a_compiled_forward_computes_no_cosine(name):
    assert transcendentals(CONFIGS[name]) == 0


def test_dynamic_ntk_still_computes_its_angles():
    assert transcendentals(dataclasses.replace(BASE, rope_scaling=DynamicNTK(16))) > 0


def test_a_cache_past_the_tables_limit_computes_its_angles():
    """The tables are constants of the program: none larger than TABLE_LIMIT entries."""
    cfg = dataclasses.replace(BASE, head_dim=64, max_len=1 << 14)  # r/2 = 32
    longest = jax_positions.TABLE_LIMIT // 32  # slots whose table is the largest allowed
    assert transcendentals(cfg, longest) == 0
    assert transcendentals(cfg, 2 * longest) > 0
