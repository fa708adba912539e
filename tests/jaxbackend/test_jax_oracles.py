"""Every oracle fixture and stories260K through the JAX backend, via the public API.

`slimllm.load` + `slimllm.generate(..., backend="jax")`: greedy ids equal the upstream oracle's
`greedy_a` exactly and their logits agree within 1e-4 relative (MODEL); the logits at every
position of every oracle prompt, from the prefill program generation itself uses (a ragged
batch, each row with its own prefix-LM and NTK facts), agree within the same bound. Seeded
sampling (temperature, top-k, top-p, min-p and repetition penalty together, a seed per row, two
seed sets, ragged rows) gives the reference backend's ids in both generation modes; a decision
within `tolerances.DECISION` of its threshold may legitimately flip, and is then reported as a
warning, not hidden. Each model's runs share one batch shape and cache length, so they share
compiled programs (prefill, decode, samplers, the loop).
"""

import warnings

import numpy as np
import pytest

import slimllm
from conftest import FIXTURES, VARIANTS
from slimllm.conformance.invariants import (
    JaxRunner,
    prefill_logits,
    rows_of,
    same_generations,
    teacher_forced,
)
from slimllm.conformance.tolerances import MODEL, assert_close
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import SamplingConfig

SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
SEEDS = ([11, 12, 13], [2**40 + 7, 5, 2**63 - 1])  # a seed per row, two seed sets per mode
MAX_NEW = 16  # the fixtures' greedy length, used by every fixture run (one cache size)
STORIES_NEW, STORIES_CACHE = 24, 256  # as in test_jax_generate: the same stories programs
REFERENCE = {}  # (checkpoint, seeds) -> the reference's sampled run, shared by both modes


def oracle_prompts(oracle) -> dict:
    """prompt_a, prompt_b (and qwen1_ntk's longer prompt_c) by key letter."""
    return {key: oracle[f"prompt_{key}"].tolist() for key in "abc" if f"prompt_{key}" in oracle}


def fixture_rows(oracle):
    """A ragged batch of three: prompt_a, prompt_b, and prompt_c (or prompt_a again)."""
    prompts = oracle_prompts(oracle)
    return [prompts["a"], prompts["b"], prompts.get("c", prompts["a"])]


def stories_rows(oracle):
    """Three ragged rows in the 16-token bucket: BOS alone and two prefixes of prompt_b."""
    prompt_b = oracle["prompt_b"].tolist()
    return [oracle["prompt_a"].tolist(), prompt_b[:7], prompt_b[:16]]


def report(notes):
    for note in notes:
        warnings.warn(note, stacklevel=2)


def check_greedy(model, oracle, rows):
    """Row 0 is prompt_a: ids and logits against the oracle; every row against the reference
    (logits up to and including the first differing step, if a boundary flip is reported)."""
    options = dict(ids=rows, max_new_tokens=len(oracle["greedy_a"]), eos_ids=(), return_logits=True)
    got = slimllm.generate(model, backend="jax", mode="stream", **options)
    assert got.ids[0] == oracle["greedy_a"].tolist()
    assert_close(got.logits[0], oracle["logits_greedy_a"], MODEL["float32"], "greedy logits")
    want = slimllm.generate(model, backend="numpy", **options)
    report(same_generations(want, got, rows, SamplingConfig(), 0))
    for r, ((w_ids, _), (g_ids, _)) in enumerate(zip(rows_of(want), rows_of(got), strict=True)):
        same = next((i for i, (a, b) in enumerate(zip(w_ids, g_ids)) if a != b), len(w_ids))
        assert_close(
            got.logits[r][: same + 1],
            want.logits[r][: same + 1],
            MODEL["float32"],
            f"row {r} logits vs reference",
        )


def check_sampling(model, rows, mode, max_new_tokens, cache_len=None):
    """The same seeds and settings give the reference's ids, row for row."""
    options = dict(ids=rows, max_new_tokens=max_new_tokens, cache_len=cache_len, **SAMPLING)
    for seeds in SEEDS:
        key = (model.source, tuple(seeds))
        if key not in REFERENCE:
            REFERENCE[key] = slimllm.generate(
                model, backend="numpy", seed=seeds, return_logits=True, **options
            )
        got = slimllm.generate(model, backend="jax", seed=seeds, mode=mode, **options)
        report(same_generations(REFERENCE[key], got, rows, SamplingConfig(**SAMPLING), seeds))


@pytest.fixture(scope="module", params=VARIANTS)
def fixture(request):
    path = FIXTURES / request.param
    return slimllm.load(path), np.load(path / "oracle.npz")


def test_fixture_full_sequence_logits(fixture):
    model, oracle = fixture
    logits = prefill_logits(model.engine(), fixture_rows(oracle), MAX_NEW)
    for key, got in zip(oracle_prompts(oracle), logits, strict=False):
        assert_close(got, oracle[f"logits_{key}"], MODEL["float32"], f"prompt_{key}")


def test_fixture_greedy_matches_the_oracle(fixture):
    model, oracle = fixture
    check_greedy(model, oracle, fixture_rows(oracle))


@pytest.mark.parametrize("mode", ["loop", "stream"])
def test_fixture_seeded_sampling_matches_the_reference(fixture, mode):
    model, oracle = fixture
    check_sampling(model, fixture_rows(oracle), mode, MAX_NEW)


def test_stories_full_sequence_logits(stories):
    """prompt_b (24 tokens) and seq_long (201) as one ragged chunk."""
    model, oracle = stories
    rows = [oracle["prompt_b"].tolist(), oracle["seq_long"].tolist()]
    got = teacher_forced(JaxRunner(model.engine()), rows, [len(r) for r in rows], Runtime())
    for key, logits in zip(("b", "long"), got, strict=True):
        assert_close(logits, oracle[f"logits_{key}"], MODEL["float32"], key)


def test_stories_greedy_matches_the_oracle(stories):
    model, oracle = stories
    check_greedy(model, oracle, stories_rows(oracle))


@pytest.mark.parametrize("mode", ["loop", "stream"])
def test_stories_seeded_sampling_matches_the_reference(stories, mode):
    model, oracle = stories
    check_sampling(model, stories_rows(oracle), mode, STORIES_NEW, STORIES_CACHE)
