"""The compiled KV cache write (`slimllm.kernels.cache`) against its definition and against the
XLA path it replaces (`jaxbackend/kv_cache.each_row` under kernels "xla").

The definition: row r of the batch puts its t new entries at slots starts[r] .. starts[r] + t of
its own row of the layer; every other slot keeps its bytes. Checked on drawn layers holding
data already, in every stored dtype (float32, bfloat16, float16, int8 codes and their float32
scales, which have no trailing dimension), batches smaller than the layer's rows (a server's
cache), and starts past the end, which both paths clamp as dynamic_update_slice does. The
kernel writes in place: a jitted write with the layer donated holds its custom call and no
copy; inside shard_map (kv heads split over 2 devices) each device writes its own heads. The
cache's own pair (conformance.pairs "kv_cache.write") runs the kernel against the reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernel_paths import needs_library
from slimllm import kernels
from slimllm.conformance import profiles
from slimllm.jaxbackend import kv_cache as jax_kv
from slimllm.kernels import cache as kernel

pytestmark = needs_library

DTYPES = ("float32", "bfloat16", "float16", "int8")


def expected(layer, rows, starts):
    """The definition in NumPy (starts clamped to [0, s - t])."""
    out = np.array(layer)
    t, s = rows.shape[2], layer.shape[2]
    for r, start in enumerate(np.asarray(starts)):
        first = min(max(int(start), 0), s - t)
        out[r, :, first : first + t] = np.asarray(rows[r])
    return out


@st.composite
def writes(draw):
    """(layer, rows, starts): a layer [B,k,s(,d)] full of drawn values and b <= B rows of t
    entries each, starts anywhere in [0, s - t] and now and then past it."""
    dtype = draw(st.sampled_from(DTYPES))
    b, extra, k = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 3))
    t = draw(st.sampled_from((1, 2, 5)))
    s = draw(st.integers(t, 24))
    tail = draw(st.sampled_from(((), (4,), (64,))))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)

    def values(shape):
        if dtype == "int8":
            return jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8))
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    layer = values((b + extra, k, s, *tail))
    rows = values((b, k, t, *tail))
    starts = draw(
        st.lists(st.integers(0, s - t + draw(st.sampled_from((0, 0, 3)))), min_size=b, max_size=b)
    )
    return layer, rows, jnp.asarray(starts, jnp.int32)


def each_row(choice):
    def run(layer, rows, starts):
        with kernels.choose(choice):
            return jax_kv.each_row(layer, rows, starts)

    return jax.jit(run)


kernel_write, xla_write = each_row("auto"), each_row("xla")


@profiles.compiling(4)
@given(writes())
def test_kernel_and_xla_paths_write_the_definition(case):
    layer, rows, starts = case
    want = expected(layer, rows, starts)
    for name, write in (("kernel", kernel_write), ("xla", xla_write)):
        got = np.asarray(write(layer, rows, starts))
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)


def test_the_write_is_in_place_and_the_kernel_only_where_asked():
    layer = jnp.zeros((4, 2, 64, 16), jnp.bfloat16)
    rows = jnp.ones((4, 2, 1, 16), jnp.bfloat16)
    starts = jnp.arange(4, dtype=jnp.int32)

    def hlo(choice):
        def run(layer, rows, starts):
            with kernels.choose(choice):
                return jax_kv.each_row(layer, rows, starts)

        return jax.jit(run, donate_argnums=0).lower(layer, rows, starts).compile().as_text()

    text = hlo("auto")
    assert "slimllm_write_rows" in text
    assert not any(
        line.lstrip().startswith("copy") or " copy(" in line for line in text.splitlines()
    )
    assert "slimllm_write_rows" not in hlo("xla")


def test_kv_heads_split_over_two_devices_with_shard_map():
    rng = np.random.default_rng(0)
    layer = jnp.asarray(rng.standard_normal((2, 4, 16, 8)).astype(np.float32))
    rows = jnp.asarray(rng.standard_normal((2, 4, 3, 8)).astype(np.float32))
    starts = jnp.asarray([2, 13], jnp.int32)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    heads = P(None, "tp")

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(heads, heads, P()), out_specs=heads)
    def split(layer, rows, starts):
        out = kernel.write_rows(layer, rows, starts)
        assert out is not None  # traced: the kernel applies
        return out

    assert "slimllm_write_rows" in split.lower(layer, rows, starts).as_text()
    np.testing.assert_array_equal(
        np.asarray(split(layer, rows, starts)), expected(layer, rows, starts)
    )
