"""The KV cache in compiled programs: written in place, never copied, int8 no dearer than float32.

Read from the compiled HLO, not timed. Every program that writes the cache (the decode step, the
whole loop, prefill), in every KV format and attention kind, on one device and on two
(shard_map), holds no copy or transpose of a buffer shaped like a layer of the cache: XLA fused
a cache write into a read of the whole layer and copied the cache to do both (5 copies per layer
per decode step), and a `lax.cond` around the loop's decode step copied the cache in and out.
A decode step of several rows writes each in place too (unrolled row updates were fused into a
loop that copied each layer first, at any batch above 1).
A prefill's scratch memory is no larger with an int8 cache than with a float32 one, and does not
grow with the layers (a constant start of each layer's scores let XLA allocate all of them at
the outset: an int8 2048-token prefill peaked at twice float32's resident memory).
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from slimllm.jaxbackend.engine import Engine, program_runtime
from slimllm.jaxbackend.generate import channel_loop_fn, decode_fn, loop_fn, prefill_fn, step_fn
from slimllm.jaxbackend.kv_cache import KV_FORMATS, padded_len
from slimllm.jaxbackend.positions import device_state
from slimllm.jaxbackend.runtime import ATTENTION, Runtime
from slimllm.jaxbackend.sampling import Sampling
from slimllm.jaxbackend.sharding import LAYOUTS
from slimllm.reference.config import ModelConfig
from slimllm.reference.params import init_params
from slimllm.reference.positions import SeqState
from slimllm.reference.sampling import SamplingConfig

# Sizes chosen apart, so that a shape holding both S and D can only be a layer of the cache.
B, S, D, T = 1, 192, 16, 32  # rows, cache slots, head dim, prompt tokens (a bucket)
CFG = ModelConfig(
    vocab=256, width=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=D, ffn_width=128, max_len=S
)
SHAPE = re.compile(r"= \w+\[([\d,]*)\]\{[^}]*\} (copy|transpose)\(")
FUSED_COPY = re.compile(r"%copy\S* = \w+\[([\d,]*)\]\{[^}]*\} fusion\(")  # a copy fused in


def cache_copies(hlo: str, fused: bool = True) -> list[str]:
    """Copies and transposes shaped like a layer's K/V [b,k,S,D] or scales [b,k,S] (any order,
    any dtype: a widened copy counts), in any computation of the program, fusions included, and
    (`fused`) loop fusions that begin with a copy (a write that copies the layer first)."""
    found = []
    for line in hlo.splitlines():
        match = SHAPE.search(line) or (fused and FUSED_COPY.search(line))
        if match:
            dims = [int(n) for n in match.group(1).split(",") if n]
            if S in dims and (D in dims or len(dims) == 3):
                found.append(line.strip())
    return found


def state(lengths):
    zeros = np.zeros(B, int)
    return device_state(SeqState(np.asarray(lengths), zeros, zeros, np.ones(B, np.float32)))


def programs(engine: Engine, fmt: str, rt: Runtime):
    """(fn, static, argument factory) of every program that writes the cache, for `engine`."""
    static = {"cfg": CFG, "rt": program_runtime(rt)}
    loop = static | {"width": 8}

    def cache():
        return engine.new_cache(B, S, fmt)

    def loop_args():
        return (
            engine.params,
            jnp.zeros((B, CFG.vocab)),
            cache(),
            state([T]),
            jnp.zeros((B, CFG.vocab), bool),
            jnp.zeros((B, 2), jnp.uint32),
            jnp.asarray([-1], jnp.int32),
            jnp.full((1, 1), -1, jnp.int32),
            jnp.zeros(1, jnp.int32),
            Sampling.of(SamplingConfig()),
            jnp.int32(8),  # max_new
        )

    return [
        decode_program(engine, fmt, rt, B),
        (
            step_fn,
            static | {"n": 2},
            lambda: (
                engine.params,
                jnp.ones(B, jnp.int32),
                cache(),
                state([T]),
                jnp.zeros((B, CFG.vocab), bool),
                jnp.zeros((B, 2), jnp.uint32),
                np.int32(1),
                Sampling.of(SamplingConfig()),
            ),
        ),
        (loop_fn, loop, loop_args),
        # stream mode's loop: channel 0 is none, so every row stops at its first step
        (channel_loop_fn, loop, lambda: (*loop_args(), jnp.int32(0))),
        (
            prefill_fn,
            static,
            lambda: (
                engine.params,
                jnp.ones((B, T), jnp.int32),
                cache(),
                state([0]),
                jnp.asarray([T - 1], jnp.int32),
            ),
        ),
    ]


def decode_program(engine: Engine, fmt: str, rt: Runtime, batch: int):
    """(fn, static, argument factory) of the decode step of `batch` rows at different lengths."""
    static = {"cfg": CFG, "rt": program_runtime(rt)}
    lengths = [S - 9 - 3 * r for r in range(batch)]
    zeros = np.zeros(batch, int)
    start = SeqState(np.asarray(lengths), zeros, zeros, np.ones(batch, np.float32))
    return (
        decode_fn,
        static,
        lambda: (
            engine.params,
            jnp.ones(batch, jnp.int32),
            engine.new_cache(batch, S, fmt),
            device_state(start),
        ),
    )


def compiled(engine: Engine, fn, static, make_args):
    """The program `engine.run` compiles for `fn` (run once, then lowered again on fresh
    arguments placed as the engine places them: the first ones were donated)."""
    engine.run(fn, static, (2,), *make_args())
    (program,) = [c.program for key, c in engine.programs.items() if key[0] == fn.__name__]
    return program.lower(*engine.place(make_args(), LAYOUTS[fn.__name__][0])).compile()


# every format on one device; the two with their own code paths (scales or none) under shard_map
RUNS = [(fmt, 1) for fmt in KV_FORMATS] + [("float32", 2), ("int8", 2)]


@pytest.mark.parametrize(("fmt", "tp"), RUNS)
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_programs_writing_the_cache_never_copy_it(attention, fmt, tp):
    assert padded_len(S) == S
    rt = Runtime(attention=attention, kv_dtype=fmt, tp=tp)
    engine = Engine(init_params(CFG), CFG, rt)
    for fn, static, make_args in programs(engine, fmt, rt):
        # A prefill writes each layer once through a fused copy (XLA:CPU, jaxlib 0.10: found when
        # fused copies were first looked for, not yet removed); steps must never copy.
        hlo = compiled(engine, fn, static, make_args).as_text()
        copies = cache_copies(hlo, fused=fn is not prefill_fn)
        assert not copies, f"{fn.__name__}: {len(copies)} cache copies, e.g. {copies[0]}"


@pytest.mark.parametrize("fmt", ["float32", "int8"])
@pytest.mark.parametrize("kernels", ["auto", "xla"])
def test_a_batch_decode_step_writes_every_row_in_place(fmt, kernels):
    """Three rows, each written at its own slot: XLA fused the unrolled row updates into a loop
    fusion that copied each layer's K and V first, at any batch above 1."""
    rt = Runtime(kv_dtype=fmt, kernels=kernels)
    engine = Engine(init_params(CFG), CFG, rt)
    copies = cache_copies(compiled(engine, *decode_program(engine, fmt, rt, 3)).as_text())
    assert not copies, f"{len(copies)} cache copies, e.g. {copies[0]}"


def prefill_memory(fmt: str, attention: str, layers: int) -> tuple[int, int]:
    """(scratch, scratch + arguments) bytes of a compiled 1024-token prefill into a 1024-slot
    cache: the arguments are the weights, the prompt and the cache, written in place."""
    cfg = CFG.replace(n_layers=layers, max_len=1024)
    engine = Engine(init_params(cfg), cfg, Runtime())
    zeros = np.zeros(1, int)
    start = device_state(SeqState(zeros, zeros, zeros, np.ones(1, np.float32)))

    def make_args():
        cache = engine.new_cache(1, 1024, fmt)
        return engine.params, jnp.ones((1, 1024), jnp.int32), cache, start, jnp.asarray([1023])

    static = {"cfg": cfg, "rt": Runtime(attention=attention, kv_dtype=fmt)}
    memory = compiled(engine, prefill_fn, static, make_args).memory_analysis()
    return memory.temp_size_in_bytes, memory.temp_size_in_bytes + memory.argument_size_in_bytes


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_int8_prefill_holds_no_more_than_float32(attention):
    """The same scores and the same scratch (to a few bytes): the int8 cache widens one block at
    a time, so what a prefill holds, with its cache, is less than with a float32 cache."""
    (scratch8, held8), (scratch32, held32) = (
        prefill_memory(fmt, attention, 2) for fmt in ("int8", "float32")
    )
    assert held8 < held32 and scratch8 <= scratch32 + 1024, (scratch8, scratch32)


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_prefill_scratch_does_not_grow_with_layers(fmt):
    """Each layer's scores are made in its own turn and reuse the previous layer's memory."""
    one, four = (prefill_memory(fmt, "naive", layers)[0] for layers in (1, 4))
    assert four < 1.25 * one, f"{four / one:.2f}x the one-layer scratch with 4 layers"
