"""The XLA product of compact weights across several tiles (the conformance pairs draw matrices
of one tile; the compiled kernel has its own tests in tests/kernels), and compact weights
through the engine's device layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slimllm import kernels
from slimllm.jaxbackend.ops import linear
from slimllm.jaxbackend.params import device_array
from slimllm.reference import weight_format as wf


@pytest.mark.parametrize("name", wf.WEIGHT_DTYPES)
@pytest.mark.parametrize("rows", [1024, 1031, 7])  # 2 tiles; a last tile that overlaps; one
def test_tiled_product_equals_the_widened_matmul(name, rows):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((64, rows)).astype(np.float32)  # reference layout [in, out]
    stored = wf.encode("w_up", w, wf.weight_format(name), 32 if name == "int4" else None)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    with kernels.choose("xla"):  # traced inside: the tiled XLA product
        got = np.asarray(jax.jit(linear)(jnp.asarray(x), device_array("w_up", stored)))
    want = x @ wf.widen(stored)
    assert got.shape == (2, 3, rows)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_an_engine_that_consumes_the_host_weights_empties_them_and_computes_the_same():
    from slimllm.api import demo_model
    from slimllm.jaxbackend.engine import Engine
    from slimllm.reference.config import ModelConfig

    cfg = ModelConfig(vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_width=64, max_len=16)  # fmt: skip
    params = wf.encode_params(demo_model(cfg).params, wf.weight_format("int8"))
    kept = Engine(params, cfg).params
    consumed = Engine(params, cfg, consume=True).params
    assert params.embed is None and all(layer is None for layer in params.layers)
    for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(consumed)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_a_tensor_parallel_split_inside_a_weight_group_is_a_clear_error():
    from slimllm.api import demo_model
    from slimllm.jaxbackend.sharding import ShardPlan, prepare
    from slimllm.reference.config import ModelConfig

    cfg = ModelConfig(vocab=64, width=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                      ffn_width=96, max_len=16)  # fmt: skip
    params = demo_model(cfg).params
    plan = ShardPlan.of(cfg, 2)
    grouped = wf.encode_params(params, wf.weight_format("int8"), 32)  # w_down: 3 groups of 32
    with pytest.raises(ValueError, match="tp=2 splits the 96 input columns of w_down inside"):
        prepare(grouped, cfg, plan)
    per_channel = prepare(wf.encode_params(params, wf.weight_format("int8")), cfg, plan)
    assert per_channel.layers[0].w_down.scale.shape == (32, 1)  # one scale per row: replicated
