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
from slimllm.jaxbackend.weight_format import from_pair_order, to_pair_order, widen
from slimllm.kernels import linear as kernel
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


@pytest.mark.parametrize("rows", [1024, 1040, 16])  # 4 tiles; a last tile that overlaps; one
def test_weights_in_pair_order_hold_each_row_and_multiply_as_rows_do(rows):
    """`Compact.pairs`: values[b, 32 j + 2 t + i] is row 16 b + t, column 2 j + i; the layout
    comes back to rows exactly, and XLA's tiled product (every path but the kernel's columns
    road) reads it as it reads rows: blocks of 16 rows per tile, 1040 rows overlapping the last
    tile by 48."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((96, rows)).astype(np.float32)  # reference layout [in, out]
    stored = device_array("w_up", wf.encode("w_up", w, wf.weight_format("bfloat16")))
    paired = wf.Compact(to_pair_order(stored.values), None, "bfloat16", pairs=True)
    values = np.asarray(stored.values)
    b, t, j, i = rows // 16 - 1, 13, 37, 1
    assert np.asarray(paired.values)[b, 32 * j + 2 * t + i] == values[16 * b + t, 2 * j + i]
    assert np.array_equal(np.asarray(from_pair_order(paired.values)), values)
    assert paired.stored_shape == paired.shape == (rows, 96)
    assert np.array_equal(np.asarray(widen(paired)), np.asarray(widen(stored)))
    x = jnp.asarray(rng.standard_normal((2, 3, 96)).astype(np.float32))
    with kernels.choose("xla"):
        got, want = (np.asarray(jax.jit(linear)(x, v)) for v in (paired, stored))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_engines_for_the_bfloat16_kernel_store_its_weights_in_pair_order():
    """kernels "fast" where the columns road runs: every bfloat16 linear weight whose rows and
    columns come in blocks of 16 and steps of 32 is stored in pair order (tables never are);
    every other kernels choice keeps rows, a model keeps one engine per layout, and XLA's
    programs read the pair order as they read rows (same logits to float32 summation order)."""
    from slimllm.api import demo_model
    from slimllm.jaxbackend.generate import generate
    from slimllm.reference.config import ModelConfig
    from slimllm.reference.generate import Stopping
    from slimllm.reference.runtime import Runtime

    cfg = ModelConfig(vocab=64, width=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_width=96, max_len=16, tied_head=False)  # fmt: skip
    model = demo_model(cfg)
    fast = model.engine(Runtime(weights="bfloat16", kernels="fast"))
    auto = model.engine(Runtime(weights="bfloat16", kernels="auto"))
    wanted = kernel.pair_order_wanted("fast")
    assert wanted == (kernels.isa() == "avx512-bf16")
    assert fast.pairs == wanted and not auto.pairs and (fast is not auto) == wanted
    layer = fast.params.layers[0]
    for w in (layer.w_qkv, layer.wo, layer.w_gate_up, layer.w_down, fast.params.lm_head):
        assert w.pairs == wanted and w.shape == widen(w).shape
    assert not fast.params.embed.pairs
    layer = auto.params.layers[0]
    assert not any(w.pairs for w in (layer.w_qkv, layer.wo, layer.w_gate_up, layer.w_down))
    rt = Runtime(weights="bfloat16", kernels="xla")
    stopping = Stopping(max_new_tokens=4)
    runs = [generate(e, [[1, 2, 3, 4]], stopping, rt=rt, return_logits=True) for e in (fast, auto)]
    got, want = (np.stack(run.rows[0].logits) for run in runs)
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
