"""Beam search in the reference: transformers' own beam search (vendored and live), an
exhaustive search on a tiny model, scores recomputed from scratch (which catches a cache reorder
that leaves the int8 scales behind), the length penalty and early stopping rules, bad options.
"""

import dataclasses
import importlib.util
import itertools
import json
import re

import numpy as np
import pytest

import slimllm
from conftest import FIXTURES, ROOT
from slimllm.reference import beam, kv_cache, positions
from slimllm.reference.beam import BeamConfig
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.generate import Stopping
from slimllm.reference.generate import generate as greedy
from slimllm.reference.model import forward
from slimllm.reference.ops import log_softmax
from slimllm.reference.params import init_params
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import SamplingConfig, repetition_penalty

ORACLE = json.loads((FIXTURES / "beam" / "beam.json").read_text())
CASES = ORACLE["cases"]
NUMPY = Runtime(backend="numpy")
TINY = ModelConfig(
    vocab=6, width=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, ffn_width=16, max_len=16
)


@pytest.fixture(scope="module")
def models():
    return {}


def fixture(models, variant):
    if variant not in models:
        models[variant] = slimllm.load(FIXTURES / variant)
    return models[variant]


def search(model, case, rt=NUMPY, prompts=None):
    """The reference's beam search on one beam.json case -> GenerateResult."""
    return beam.generate(
        model.params,
        model.cfg,
        prompts or [case["prompt"]],
        Stopping(max_new_tokens=case["max_new_tokens"], eos_ids=case["eos_ids"]),
        BeamConfig(case["num_beams"], case["length_penalty"], case["early_stopping"]),
        SamplingConfig(repetition_penalty=case["repetition_penalty"]),
        rt=rt,
    )


def assert_hypotheses(got, want, where):
    """Same ids for every hypothesis, in order; scores equal up to float32 summation."""
    assert [ids for ids, _ in got] == [h["ids"] for h in want], where
    scores = [s for _, s in got]
    assert scores == pytest.approx([h["score"] for h in want], rel=1e-6, abs=2e-5), where


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['variant']}-m{c['num_beams']}")
def test_equals_transformers_beam_search(models, case):
    result = search(fixture(models, case["variant"]), case)
    assert_hypotheses(result.rows[0].hypotheses, case["hypotheses"], case)
    best = result.rows[0]
    assert best.ids == case["hypotheses"][0]["ids"]
    assert best.finish_reason == ("eos" if best.ids[-1] in case["eos_ids"] else "length")


def test_cases_exercise_every_rule():
    """The vendored cases end hypotheses on EOS and at max length, for every early_stopping."""
    for early in (True, False, "never"):
        ends = {
            h["ids"][-1] in c["eos_ids"]
            for c in CASES
            if repr(c["early_stopping"]) == repr(early)  # True is not 1, "never" not True
            for h in c["hypotheses"]
        }
        assert ends == {True, False}, early


def test_equals_transformers_live(models):
    """transformers installed: its beam search now, on every vendored case, equals the file
    (so the file is current) and the reference."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "make_beam", ROOT / "dev" / "make_beam_fixture.py"
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert [{k: v for k, v in c.items() if k != "hypotheses"} for c in CASES] == make.cases()
    hf_models = {}
    for case in CASES:
        live = make.run_case(case, hf_models)
        assert [h["ids"] for h in live] == [h["ids"] for h in case["hypotheses"]], case
        got = search(fixture(models, case["variant"]), case).rows[0].hypotheses
        assert_hypotheses(got, live, case)


def test_one_beam_without_eos_is_greedy(models):
    model = fixture(models, "llama")
    prompt = CASES[0]["prompt"]
    stopping = Stopping(max_new_tokens=12)
    want = greedy(model.params, model.cfg, [prompt], stopping, rt=NUMPY).rows[0].ids
    one = beam.generate(model.params, model.cfg, [prompt], stopping, BeamConfig(1), rt=NUMPY)
    assert one.rows[0].ids == want
    # the API runs greedy generation for num_beams=1, EOS ids and all (as HF does)
    eos = (want[3],)
    api = slimllm.generate(model, ids=prompt, max_new_tokens=12, eos_ids=eos, backend="numpy")
    api_one = slimllm.generate(
        model, ids=prompt, max_new_tokens=12, eos_ids=eos, backend="numpy", num_beams=1
    )
    assert api_one.ids == api.ids == [want[:4]] and api_one.scores == []


def test_ragged_batch_rows_equal_rows_alone(models):
    model = fixture(models, "qwen2")
    case = next(c for c in CASES if c["variant"] == "qwen2" and c["early_stopping"] is True)
    prompts = [case["prompt"], case["prompt"][3:], case["prompt"][:5]]
    batch = search(model, case, prompts=prompts)
    for r, prompt in enumerate(prompts):
        alone = search(model, case, prompts=[prompt])
        assert batch.rows[r].hypotheses == alone.rows[0].hypotheses, r


def rescore(params, cfg, prompt, ids, rt, penalty=1.0):
    """Sum of (penalised) log-probs of `ids` after `prompt`, from one forward over both through
    a fresh cache of rt's format: what beam search must have added up."""
    tokens = prompt + ids
    cache = kv_cache.init_cache(cfg, 1, len(tokens), rt.kv_dtype)
    state = positions.start_state(cfg, [tokens])
    logits, _ = forward(params, cfg, np.array([tokens]), cache, state, rt)
    logp = log_softmax(logits[0, len(prompt) - 1 : -1].astype(np.float32))  # [n,v]
    total = 0.0
    for i, token in enumerate(ids):
        seen = np.zeros((1, cfg.vocab), bool)
        seen[0, tokens[: len(prompt) + i]] = True
        total += float(repetition_penalty(logp[i : i + 1], seen, penalty)[0, token])
    return total


def values_only(cache, rows):
    """The paper engine's reorder: keys and values follow their beams, int8 scales stay (the
    first copy of each prompt row to its beams, a change of batch, copies them too)."""
    if len(rows) != cache.batch:
        return REORDER(cache, rows)
    return dataclasses.replace(
        cache, k=tuple(x[rows] for x in cache.k), v=tuple(x[rows] for x in cache.v)
    )


REORDER = beam.reorder


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_scores_equal_a_recomputation_from_scratch(models, kv_dtype, monkeypatch):
    """Every hypothesis' score is its log-probs recomputed through a fresh cache / n ** lp:
    the reordered cache equals the cache each beam would have built alone. With int8 scales
    left behind (`values_only`), the same check fails."""
    rt = Runtime(backend="numpy", kv_dtype=kv_dtype)
    for variant in ("llama", "opt"):
        model = fixture(models, variant)
        case = next(c for c in CASES if c["variant"] == variant and c["repetition_penalty"] > 1)
        assert score_error(model, case, search(model, case, rt), rt) < 1e-4, variant
        if kv_dtype == "int8":
            monkeypatch.setattr(beam, "reorder", values_only)
            wrong = search(model, case, rt)
            assert score_error(model, case, wrong, rt) > 1e-2, "the check misses unmoved scales"
            monkeypatch.undo()


def score_error(model, case, result, rt) -> float:
    """The largest |sum of log-probs - its recomputation| of a result's hypotheses (the sum:
    the score times n ** length_penalty)."""
    lp, penalty = case["length_penalty"], case["repetition_penalty"]
    return max(
        abs(rescore(model.params, model.cfg, case["prompt"], ids, rt, penalty) - s * len(ids) ** lp)
        for ids, s in result.rows[0].hypotheses
    )


def test_reorder_moves_every_layer_and_int8_scales():
    cfg = dataclasses.replace(TINY, vocab=32, n_layers=2)
    params = init_params(cfg, seed=1)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    rt = Runtime(backend="numpy", kv_dtype="int8")
    cache = kv_cache.init_cache(cfg, 3, 8, "int8")
    _, cache = forward(
        params, cfg, np.array(prompts), cache, positions.start_state(cfg, prompts), rt
    )
    rows = np.array([2, 0, 0])
    moved = beam.reorder(cache, rows)
    assert not np.allclose(cache.k_scale[1][0], cache.k_scale[1][2])  # rows' scales differ
    fresh = kv_cache.init_cache(cfg, 3, 8, "int8")
    again = [prompts[r] for r in rows]
    _, fresh = forward(params, cfg, np.array(again), fresh, positions.start_state(cfg, again), rt)
    for name in ("k", "v", "k_scale", "v_scale"):
        for layer in range(cfg.n_layers):
            np.testing.assert_array_equal(getattr(moved, name)[layer], getattr(fresh, name)[layer])


def exhaustive(params, cfg, prompt, horizon, eos, lp, penalty):
    """The best sequence under HF's score over every sequence beam search could finish: ids
    ending on EOS before `horizon`, or any `horizon` ids, with no EOS before the last."""
    rt = Runtime(backend="numpy")
    best = (-np.inf, None)
    for n in range(1, horizon + 1):
        for ids in itertools.product(range(cfg.vocab), repeat=n):
            ids = list(ids)
            if any(t == eos for t in ids[:-1]) or (n < horizon and ids[-1] != eos):
                continue
            score = rescore(params, cfg, prompt, ids, rt, penalty) / n**lp
            best = max(best, (score, ids), key=lambda x: x[0])
    return best


def test_extreme_length_penalties_are_no_error(models):
    """n ** length_penalty past float32's range: scores of -0 or -inf, none below HF's empty
    slot (-1e9) kept as a hypothesis, and a result (the best running beam if none is left)."""
    model = fixture(models, "llama")
    case = next(c for c in CASES if c["variant"] == "llama" and len(c["eos_ids"]) == 2)
    for lp in (1e30, -1e30):
        for eos in (case["eos_ids"], []):
            row = search(model, case | {"length_penalty": lp, "eos_ids": eos}).rows[0]
            assert all(s > -1e9 for _, s in row.hypotheses)
            assert row.ids and row.score == (row.hypotheses[0][1] if row.hypotheses else -np.inf)


@pytest.mark.parametrize(
    "lp, early, penalty",
    [(1.0, False, 1.0), (-1.0, True, 1.0), (2.0, "never", 1.4), (0.0, False, 1.0)],
)
def test_enough_beams_find_the_exhaustive_best(lp, early, penalty):
    """With num_beams >= vocab ** (horizon - 1) nothing is ever pruned: the result is the best
    of all sequences (ties aside) under the hypothesis score."""
    # seed and EOS id chosen so that the four cases' best sequences have 3, 1, 3 and 2 ids
    params, horizon, eos, prompt = init_params(TINY, seed=4), 3, 3, [1, 4]
    score, ids = exhaustive(params, TINY, prompt, horizon, eos, lp, penalty)
    result = beam.generate(
        params,
        TINY,
        [prompt],
        Stopping(max_new_tokens=horizon, eos_ids=(eos,)),
        BeamConfig(TINY.vocab ** (horizon - 1), lp, early),
        SamplingConfig(repetition_penalty=penalty),
        rt=NUMPY,
    )
    assert result.rows[0].ids == ids
    assert result.rows[0].score == pytest.approx(score, abs=1e-5)


def test_length_penalty_and_early_stopping(models):
    """A larger length penalty never picks a shorter best hypothesis; early stopping True
    settles no later than False, "never" (length_penalty > 0) no earlier, and each later one
    can only find a better hypothesis."""
    model = fixture(models, "llama")
    base = next(c for c in CASES if c["variant"] == "llama" and len(c["eos_ids"]) == 2)
    lengths = [
        len(search(model, base | {"length_penalty": lp}).rows[0].ids)
        for lp in (-1.0, 0.0, 1.0, 3.0)
    ]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], lengths
    strict = set()
    for variant in ("llama", "qwen2", "opt"):
        for case in CASES:
            if case["variant"] != variant or case["length_penalty"] <= 0:
                continue
            runs = [
                search(fixture(models, variant), case | {"early_stopping": e})
                for e in (True, False, "never")
            ]
            steps = [r.decode_steps for r in runs]
            scores = [r.rows[0].score for r in runs]
            assert steps == sorted(steps) and scores == sorted(scores), (case, steps, scores)
            strict |= {i for i in range(2) if steps[i] < steps[i + 1]}
    assert strict == {0, 1}, "the cases never tell the three rules apart"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_beams=0), "num_beams must be an integer in [1, 256]"),
        (dict(num_beams=2.0), "num_beams must be an integer in [1, 256]"),
        (dict(num_beams=True), "num_beams must be an integer in [1, 256]"),
        (dict(num_beams=2**70), "num_beams must be an integer in [1, 256]"),
        (dict(num_beams=None), "num_beams must be an integer in [1, 256]"),
        (dict(num_beams=2, length_penalty=float("inf")), "length_penalty must be a finite"),
        (dict(num_beams=2, early_stopping=None), "early_stopping must be True, False or"),
        (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite"),
        (dict(num_beams=2, length_penalty="1"), "length_penalty must be a finite"),
        (dict(num_beams=2, early_stopping="always"), "early_stopping must be True, False or"),
        (dict(num_beams=2, early_stopping=1), "early_stopping must be True, False or"),
        (dict(num_beams=2, temperature=0.7), "temperature is a sampling setting"),
        (dict(num_beams=2, top_k=3), "top_k is a sampling setting"),
        (dict(num_beams=2, top_p=0.5), "top_p is a sampling setting"),
        (dict(num_beams=2, min_p=0.1), "min_p is a sampling setting"),
        (dict(num_beams=2, stop=[[3, 4]]), "stop (strings or id sequences) is not supported"),
        (dict(num_beams=2, return_logits=True), "return_logits is not supported"),
        (dict(num_beams=2, mode="loop"), "mode='loop' needs num_beams=1"),
    ],
)
def test_bad_options_raise_option_errors_naming_them(models, options, message):
    model = fixture(models, "llama")
    for backend in ("numpy", "jax"):  # checked before any JAX program runs
        with pytest.raises(OptionError, match=re.escape(message)):
            slimllm.generate(model, ids=[1, 2], max_new_tokens=4, backend=backend, **options)
