"""What makes a new compiled program, and what does not.

A new prompt length inside its bucket, a new max_new_tokens inside its output and cache
buckets, new sampling values (temperature, top-k, top-p, min-p, penalty): none compiles
anything, in loop or stream mode, and the tokens still equal the reference's. The sampler with
traced values (`sampling.Sampling`) equals the reference for values drawn freely.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import slimllm
from slimllm.conformance.invariants import same_generations
from slimllm.conformance.pairs import Case, decisions, logits_and_seen, sample_sampling, seeds
from slimllm.jaxbackend import sampling as jax_sampling
from slimllm.jaxbackend.generate import MIN_CACHE, cache_length
from slimllm.reference import sampling as ref_sampling
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import GREEDY_BELOW, SamplingConfig

# one structure (greedy off, every processor on), values far apart
SAMPLED = [
    dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=1.3, top_k=40, top_p=0.5, min_p=0.2, repetition_penalty=0.9),
    dict(temperature=1.0, top_k=2, top_p=0.99, min_p=0.01, repetition_penalty=1.5),
]
GREEDY = [dict(repetition_penalty=1.2), dict(repetition_penalty=1.7)]
PROMPTS = (5, 12, 9)  # tokens: one bucket (16)
MAX_NEW = (9, 16, 11)  # one output bucket (16); prompt + max_new stays under MIN_CACHE


def test_new_values_in_their_buckets_compile_nothing(stories):
    model, oracle = stories
    prompt = oracle["prompt_b"].tolist()
    engine = model.engine(Runtime())
    for mode in ("loop", "stream"):
        for settings in (SAMPLED, GREEDY):
            runs = [
                dict(ids=prompt[:n], max_new_tokens=m, seed=i, eos_ids=(), **values)
                for i, (n, m, values) in enumerate(zip(PROMPTS, MAX_NEW, settings))
            ]
            slimllm.generate(model, mode=mode, **runs[0])
            programs = len(engine.programs)
            for options in runs[1:]:
                got = slimllm.generate(model, mode=mode, **options)
                want = slimllm.generate(model, backend="numpy", return_logits=True, **options)
                sc = SamplingConfig(**{k: v for k, v in options.items() if k in SAMPLED[0]})
                assert not same_generations(want, got, [options["ids"]], sc, options["seed"])
            assert len(engine.programs) == programs, (mode, settings)


def test_cache_length_buckets_waste_at_most_a_quarter():
    lengths = [cache_length([[1] * 20], n - 20, Runtime(), 4096) for n in range(21, 4097)]
    assert sorted(set(lengths))[:9] == [256, 320, 384, 448, 512, 640, 768, 896, 1024]
    assert all(n <= got <= max(MIN_CACHE, 1.25 * n) for n, got in zip(range(21, 4097), lengths))
    assert cache_length([[1] * 20], 10, Runtime(), 100) == 100  # never past the model's context
    assert cache_length([[1] * 20], 10, Runtime(cache_len=40), 4096) == 40  # as asked
    assert cache_length([[1] * 40], 1, Runtime(cache_len=41), 4096) == 64  # the prompt bucket


values = st.builds(
    SamplingConfig,
    temperature=st.one_of(st.just(0.0), st.floats(GREEDY_BELOW, 4.0)),
    top_k=st.integers(0, 40),
    top_p=st.floats(0.01, 1.0),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.25, 4.0)),
)
traced_sample = jax.jit(jax_sampling.sample)  # every SamplingConfig value is an argument


@given(logits_and_seen(), values, seeds, st.integers(0, 1000))
def test_traced_values_sample_as_the_reference(x_seen, sc, seed, step):
    x, seen = x_seen
    seed = seed[:1].repeat(2)
    got = traced_sample(
        jnp.asarray(x),
        jax_sampling.Sampling.of(sc),
        jnp.asarray(seen),
        jnp.asarray(jax_sampling.seed_words(seed)),
        step,
    )
    want = ref_sampling.sample(x, sc, seen, seed, step)
    case = Case((x, sc, seen, seed, step), ())
    decisions(sample_sampling)(want, np.asarray(got), case)


def test_one_program_per_structure_and_shape():
    """Values only: one program; a processor turned on: one more."""
    sample = jax.jit(lambda *args: jax_sampling.sample(*args))  # its own program cache
    x, seen = jnp.zeros((2, 8)), jnp.zeros((2, 8), bool)
    words = jnp.asarray(jax_sampling.seed_words([1, 2]))
    for t, k in ((0.5, 3), (1.5, 7), (0.9, 1)):
        sample(x, jax_sampling.Sampling.of(SamplingConfig(t, top_k=k)), seen, words, 0)
    assert sample._cache_size() == 1
    sample(x, jax_sampling.Sampling.of(SamplingConfig(0.5, top_k=3, top_p=0.5)), seen, words, 0)
    assert sample._cache_size() == 2
