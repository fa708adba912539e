"""Beam search in JAX: transformers' own beam search (vendored), the reference's choices under
tensor parallelism and an int8 cache, the compiled reorder of cache rows with their scales,
ragged batches through the API.

Programs per (fixture, num_beams): prefill, the first copy of the prompt rows to their beams,
decode and reorder at b x m rows; the cases share them (one cache length, one prompt bucket).
"""

import json

import jax
import numpy as np
import pytest

import slimllm
from conftest import FIXTURES
from slimllm.jaxbackend import beam as jax_beam
from slimllm.jaxbackend.kv_cache import init_cache
from slimllm.reference import beam
from slimllm.reference.beam import BeamConfig
from slimllm.reference.generate import Stopping
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import SamplingConfig

CASES = json.loads((FIXTURES / "beam" / "beam.json").read_text())["cases"]


@pytest.fixture(scope="module")
def models():
    return {variant: slimllm.load(FIXTURES / variant) for variant in ("llama", "qwen2", "opt")}


def settings(case):
    return (
        Stopping(max_new_tokens=case["max_new_tokens"], eos_ids=case["eos_ids"]),
        BeamConfig(case["num_beams"], case["length_penalty"], case["early_stopping"]),
        SamplingConfig(repetition_penalty=case["repetition_penalty"]),
    )


def assert_same(got, want, where):
    """Same ids for every hypothesis, in order; scores equal up to float32 rounding."""
    assert [ids for ids, _ in got] == [ids for ids, _ in want], where
    scores = [s for _, s in want]
    assert [s for _, s in got] == pytest.approx(scores, rel=1e-6, abs=2e-5), where


def test_equals_transformers_beam_search(models):
    for case in CASES:
        model = models[case["variant"]]
        stopping, config, sampling = settings(case)
        result = jax_beam.generate(
            model.engine(Runtime()), [case["prompt"]], stopping, config, sampling
        )
        want = [(h["ids"], h["score"]) for h in case["hypotheses"]]
        assert_same(result.rows[0].hypotheses, want, case)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_equals_the_reference(models, tp, kv_dtype):
    """Any tp and cache format: the reference's hypotheses (with int8, a reorder that left the
    scales behind would change them: tests/reference/test_beam.py)."""
    model = models["llama"]
    case = next(c for c in CASES if c["variant"] == "llama" and c["early_stopping"] == "never")
    stopping, config, sampling = settings(case)
    rt = Runtime(kv_dtype=kv_dtype, tp=tp)
    want = beam.generate(
        model.params,
        model.cfg,
        [case["prompt"]],
        stopping,
        config,
        sampling,
        rt=rt.replace(backend="numpy", tp=1),
    )
    got = jax_beam.generate(model.engine(rt), [case["prompt"]], stopping, config, sampling, rt=rt)
    assert_same(got.rows[0].hypotheses, want.rows[0].hypotheses, (tp, kv_dtype))


def test_one_beam_without_eos_is_greedy(models):
    model = models["llama"]
    prompt = CASES[0]["prompt"]
    want = slimllm.generate(model, ids=prompt, max_new_tokens=12, eos_ids=(), backend="numpy")
    engine = model.engine(Runtime())
    one = jax_beam.generate(engine, [prompt], Stopping(max_new_tokens=12), BeamConfig(1))
    assert one.rows[0].ids == want.ids[0]


@pytest.mark.parametrize("tp", [1, 2])
def test_reorder_moves_values_and_int8_scales_of_every_layer(models, tp):
    model = models["qwen2"]
    engine = model.engine(Runtime(tp=tp))
    cache = init_cache(model.cfg, 3, 64, "int8", kv_heads=engine.kv_heads)
    rng = np.random.default_rng(0)
    host = jax.tree_util.tree_map(
        lambda x: (
            rng.integers(-127, 128, x.shape).astype(x.dtype)
            if x.dtype == np.int8
            else rng.random(x.shape, np.float32)
        ),
        cache,
    )
    rows = np.array([2, 0, 0])
    moved = jax_beam.reorder(engine, engine.place((host,), ("cache",))[0], rows)
    for got, was in zip(
        jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(host), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(was)[rows])
    assert len(jax.tree_util.tree_leaves(moved)) == 4 * model.cfg.n_layers  # k, v, k/v scales


def test_api_ragged_batch_equals_the_reference(models):
    model = models["opt"]
    case = next(c for c in CASES if c["variant"] == "opt" and c["early_stopping"] is True)
    prompts = [case["prompt"], case["prompt"][2:9], case["prompt"][:4]]
    options = dict(
        ids=prompts,
        max_new_tokens=case["max_new_tokens"],
        eos_ids=case["eos_ids"],
        num_beams=case["num_beams"],
        length_penalty=case["length_penalty"],
        early_stopping=case["early_stopping"],
        repetition_penalty=case["repetition_penalty"],
    )
    want = slimllm.generate(model, backend="numpy", **options)
    seen = []
    got = slimllm.generate(
        model, backend="jax", on_token=lambda r, t: seen.append((r, t)), **options
    )
    assert got.ids == want.ids and got.finish_reasons == want.finish_reasons
    assert got.scores == pytest.approx(want.scores, rel=1e-6, abs=2e-5)
    assert seen == [(r, t) for r, ids in enumerate(got.ids) for t in ids]  # once it has ended
    assert set(got.finish_reasons) == {"eos", "length"}, "the rows no longer stop both ways"
