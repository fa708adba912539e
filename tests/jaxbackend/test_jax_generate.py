"""JAX generation: loop mode == stream mode == the reference, on ragged batches of stories260K.

Greedy, EOS ids, stop sequences and max tokens, each checked for ids and finish reasons in
both JAX modes against the NumPy reference (a trained model, so rows stop at different steps
for different reasons); a ragged batch row generates what it generates alone, greedy and
seeded; the JAX engine's programs are shared with the other stories tests (session fixture).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slimllm
from slimllm.conformance.invariants import rows_equal_alone, rows_of, same_generations
from slimllm.jaxbackend.sampling import first_argmax
from slimllm.reference.sampling import SamplingConfig

MAX_NEW = 24
CACHE = 256  # as test_jax_oracles' stories runs: the same batch shape and cache, shared programs
SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def setup(stories):
    """The model, a ragged batch, and the reference's free greedy run of it."""
    model, oracle = stories
    prompt_b = oracle["prompt_b"].tolist()
    rows = [oracle["prompt_a"].tolist(), prompt_b[:7], prompt_b[:16]]
    free = slimllm.generate(
        model, ids=rows, max_new_tokens=MAX_NEW, eos_ids=(), backend="numpy", cache_len=CACHE
    )
    return model, rows, free.ids


def stopping_cases(free):
    """(name, options): max tokens alone, an EOS id that row 0 emits mid-way, a two-token stop
    sequence from row 2, and both at once (one loop program per shape of the stop rules)."""
    eos = free[0][MAX_NEW // 3]
    stop = free[2][MAX_NEW // 2 : MAX_NEW // 2 + 2]
    return [
        ("length", dict(eos_ids=(), stop=())),
        ("eos", dict(eos_ids=(eos,), stop=())),
        ("stop", dict(eos_ids=(), stop=[stop])),
        ("eos+stop", dict(eos_ids=(eos,), stop=[stop])),
    ]


def test_loop_equals_stream_equals_reference_on_every_stopping_rule(setup):
    model, rows, free = setup
    reasons = set()
    for name, options in stopping_cases(free):
        options = dict(ids=rows, max_new_tokens=MAX_NEW, cache_len=CACHE) | options
        want = slimllm.generate(model, backend="numpy", return_logits=True, **options)
        for mode in ("loop", "stream"):
            got = slimllm.generate(model, backend="jax", mode=mode, **options)
            assert not same_generations(want, got, rows, SamplingConfig(), 0), (name, mode)
        reasons |= {reason for _, reason in rows_of(want)}
    assert reasons == {"length", "eos", "stop"}, "the cases no longer exercise every rule"


@pytest.mark.parametrize("sampling", [{}, SAMPLING], ids=["greedy", "sampled"])
def test_ragged_batch_rows_equal_rows_alone(setup, sampling):
    model, rows, _ = setup

    def run(prompts, seeds):
        return slimllm.generate(
            model,
            ids=prompts,
            max_new_tokens=MAX_NEW,
            eos_ids=(),
            seed=seeds,
            cache_len=CACHE,
            backend="jax",
            mode="stream",
            **sampling,
        )

    rows_equal_alone(run, rows, [3, 4, 5])


@pytest.mark.parametrize("logits", [False, True], ids=["channel", "per-token"])
def test_the_prefill_clock_stops_before_the_first_token(setup, logits):
    """generate queues the token loop behind the prefill before it waits for the prefill's
    logits; the prefill's clock must still stop at those logits, not after the loop."""
    model, rows, _ = setup
    stamps = []
    for _ in range(2):  # the second call compiles nothing
        stamps.clear()
        t0 = time.perf_counter()
        out = slimllm.generate(
            model,
            ids=rows,
            max_new_tokens=MAX_NEW,
            eos_ids=(),
            cache_len=CACHE,
            backend="jax",
            mode="stream",
            return_logits=logits,
            on_token=lambda row, token: stamps.append(time.perf_counter()),
        )
        t1 = time.perf_counter()
    assert len(stamps) == len(rows) * MAX_NEW
    assert 0 < out.prefill_seconds and t0 + out.prefill_seconds <= stamps[0]
    assert 0 < out.decode_seconds and out.prefill_seconds + out.decode_seconds <= t1 - t0


def test_the_greedy_choice_is_numpys_argmax():
    """`first_argmax` (two plain reductions in place of XLA's argmax) picks what np.argmax picks:
    the first of tied maxima, the first NaN of a row that has one, 0 for a row of -inf."""
    rng = np.random.default_rng(0)
    for case in range(60):
        x = rng.standard_normal((4, 40)).astype(np.float32)
        x[0, rng.integers(0, 40, 5)] = x[0].max()  # ties
        if case % 2:
            x[1, rng.integers(0, 40, 2)] = np.nan
        x[2] = -np.inf
        x[3, rng.integers(0, 40)] = np.inf
        got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
        assert (got == np.argmax(x, axis=-1)).all(), (case, got)
