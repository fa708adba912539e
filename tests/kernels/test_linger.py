"""Helpers that linger after decode-sized calls (`parallel_for` in src/kernels.h, `linger` in
src/cpu.cc): each call posts its items on a board, and a helper of an earlier call that still
watches the board takes them instead of a sleeping pool thread being woken. Which thread runs an
item never changes its result: products and attention come out with the same bits whether the
helpers linger or not, with prefill-sized calls (after which they leave) between decode-sized
ones, and with two devices' calls at once (shard_map)."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import slimllm
from conftest import FIXTURES, ROOT
from kernel_paths import needs_library
from slimllm import kernels
from slimllm.jaxbackend.weight_format import widen
from slimllm.kernels import linear as kernel
from slimllm.reference.errors import OptionError
from slimllm.reference.weight_format import ENCODINGS, Compact

pytestmark = needs_library

LONG = 200_000  # us: a helper that lingers this long stays through a whole test's calls


@pytest.fixture
def restore_linger():
    before = kernels.linger_us()
    yield
    kernels.set_linger_us(before)


def weights(encoding: str, n: int, k: int, seed: int):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    if encoding == "float32":
        return jnp.asarray(w)
    values, scale = ENCODINGS[encoding].encode(w, 32 if encoding == "int4" else None)
    return Compact(jnp.asarray(values), None if scale is None else jnp.asarray(scale), encoding)


def chain(ws):
    """A jitted chain of products, each x the previous output's first columns: one call after
    another, as a model's layers make them (XLA's product where the kernel does not apply)."""

    @jax.jit
    def run(x):
        outs = []
        with kernels.choose("fast"):
            for w in ws:
                y = kernel.linear(x, w)
                if y is None:  # float32 beyond 16 rows of x, or no road for this many
                    y = x @ widen(w).T
                outs.append(y)
                x = y[:, : x.shape[1]] / 16.0
        return outs

    return run


def both(run, *args):
    """run(*args) with helpers lingering LONG and not at all, as numpy arrays."""
    out = {}
    for us in (LONG, 0):
        kernels.set_linger_us(us)
        run(*args)  # a first call, so that helpers of the setting before have left
        out[us] = [np.asarray(a) for a in jax.block_until_ready(run(*args))]
    return out[LONG], out[0]


@pytest.mark.parametrize("encoding", ["float32", "bfloat16", "int8", "int4"])
def test_products_are_the_same_bits_whether_helpers_linger_or_not(restore_linger, encoding):
    ws = [weights(encoding, 512, 256, seed) for seed in range(6)]
    run = chain(ws)
    for m in (1, 4, 16, 40):  # 40: prefill-sized, after which helpers go back to the pool
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 256)).astype(np.float32))
        lingered, plain = both(run, x)
        for a, b in zip(lingered, plain):
            assert a.tobytes() == b.tobytes(), (encoding, m)


def test_lingering_helpers_take_the_next_calls_jobs(restore_linger):
    """With a linger, helpers of one call run the items of the calls after it (the board's
    counter moves; on a loaded machine only once the helper gets a core, so the chain runs
    until then); with none, no helper watches the board."""
    run = chain([weights("int8", 512, 256, seed) for seed in range(8)])
    x = jnp.ones((1, 256), jnp.float32)
    kernels.set_linger_us(LONG)
    jax.block_until_ready(run(x))
    before, runs, until = kernels.linger_taken(), 0, time.monotonic() + 30
    while kernels.linger_taken() == before and time.monotonic() < until:
        jax.block_until_ready(run(x))
        runs += 1
    assert kernels.linger_taken() > before

    kernels.set_linger_us(0)
    jax.block_until_ready(run(x))  # a lingering helper leaves after its next job
    time.sleep(0.05)  # (and may still be on its way out)
    before = kernels.linger_taken()
    for _ in range(max(runs, 5)):
        jax.block_until_ready(run(x))
    assert kernels.linger_taken() == before


def test_two_devices_calls_at_once_keep_their_bits(restore_linger):
    """tp=2 in one process: the two devices' custom calls run at once and post on the same
    board, so a lingering helper may run either's items; each rank's slice is unchanged."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    w = weights("int8", 1024, 256, 7)
    spec = Compact(PartitionSpec("tp", None), PartitionSpec("tp", None), "int8")

    @jax.jit
    def run(x, w):
        def rank(x, w):
            outs = []
            with kernels.choose("fast"):
                for _ in range(6):
                    y = kernel.linear(x, w)
                    outs.append(y)
                    x = x + y[:, :1] / 64.0
            return jnp.stack(outs)

        return jax.shard_map(
            rank,
            mesh=mesh,
            in_specs=(PartitionSpec(), spec),
            out_specs=PartitionSpec(None, None, "tp"),
        )(x, w)

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32))
    lingered, plain = both(lambda x: [run(x, w)], x)
    assert lingered[0].tobytes() == plain[0].tobytes()


def test_generation_gives_the_same_ids_whether_helpers_linger_or_not(restore_linger):
    """The whole decode (products, decode attention, the LM head) with and without a linger."""
    model = slimllm.load(FIXTURES / "llama")
    ids = {}
    for us in (LONG, 0):
        kernels.set_linger_us(us)
        out = slimllm.generate(model, ids=[[1, 5, 9, 2]], max_new_tokens=12, eos_ids=())
        ids[us] = out.ids
    assert ids[LONG] == ids[0]


@pytest.mark.parametrize("bad", [-1, True, 1.5, "200", 1_000_001])
def test_a_linger_that_is_not_whole_microseconds_is_refused(bad):
    with pytest.raises(OptionError, match=r"whole number of microseconds in 0\.\.1000000"):
        kernels.set_linger_us(bad)


def test_the_environment_sets_the_linger_and_a_bad_value_is_named():
    code = "from slimllm import kernels; print(kernels.linger_us())"

    def child(value):
        env = dict(os.environ, SLIMLLM_KERNELS_LINGER_US=value)
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)

    done = child("0")
    assert done.returncode == 0 and done.stdout.decode().strip() == "0", done.stderr.decode()
    done = child("50us")
    assert done.returncode != 0
    assert "SLIMLLM_KERNELS_LINGER_US='50us' is not a whole number" in done.stderr.decode()
    done = child("1000001")
    assert done.returncode != 0
    assert "microseconds in 0..1000000" in done.stderr.decode()
