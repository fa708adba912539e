"""Token logprobs (reference/logprobs.py): the definition checked against float64 maths, its
order and tie rule, its option check, and `generate(logprobs=n)` on stories260K (the chosen id's
logprob is log_softmax of the logits that chose it, greedy picks the top alternative)."""

import numpy as np
import pytest

import slimllm
from slimllm.conformance.tolerances import FUNCTION, assert_close
from slimllm.reference.errors import OptionError
from slimllm.reference.logprobs import (
    MAX_LOGPROBS,
    TokenLogprob,
    check_logprobs,
    log_softmax,
    token_logprobs,
)

TOL = FUNCTION["float32"]


def direct_log_softmax(x):
    """log(exp(x) / sum exp(x)) in float64, shifted only to keep exp finite."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.log(e / e.sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e-3])
def test_logprobs_equal_a_direct_log_softmax(scale):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 50)) * scale).astype(np.float32)
    ids = np.array([0, 17, 49])
    chosen, top, top_lp = token_logprobs(logits, ids, 7)
    want = direct_log_softmax(logits)
    assert chosen.dtype == np.float32 and top.dtype == np.int32 and top_lp.dtype == np.float32
    assert_close(chosen, want[np.arange(3), ids], TOL, "chosen")
    assert_close(top_lp, np.take_along_axis(want, top.astype(np.int64), -1), TOL, "top")
    assert (top == np.argsort(-want, axis=-1, kind="stable")[:, :7]).all()


def test_probabilities_sum_to_one_and_huge_logits_stay_finite():
    rng = np.random.default_rng(1)
    for scale in (1.0, 1e4, 1e30):
        logits = (rng.standard_normal((2, 64)) * scale).astype(np.float32)
        _, top, top_lp = token_logprobs(logits, np.zeros(2, int), 64)  # every id
        assert np.isfinite(top_lp[:, 0]).all()
        assert np.allclose(np.exp(top_lp.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
        assert (np.sort(top, -1) == np.arange(64)).all()  # every id exactly once


def test_top_n_is_descending_with_ties_to_the_lowest_id():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, -1.0, 3.0]], np.float32)
    chosen, top, top_lp = token_logprobs(logits, np.array([4]), 5)
    assert top.tolist() == [[1, 3, 6, 2, 4]]
    assert top_lp[0, 0] == top_lp[0, 1] == top_lp[0, 2] > top_lp[0, 3] == top_lp[0, 4]
    assert chosen[0] == top_lp[0, 4]  # id 4 read the same way, wherever it is looked up


def test_n_zero_gives_empty_alternatives():
    logits = np.arange(12, dtype=np.float32).reshape(2, 6)
    chosen, top, top_lp = token_logprobs(logits, np.array([5, 0]), 0)
    assert top.shape == top_lp.shape == (2, 0) and top.dtype == np.int32
    assert_close(chosen, log_softmax(logits)[[0, 1], [5, 0]], 0.0)


def test_check_logprobs():
    assert check_logprobs(None, 512) is None
    assert check_logprobs(0, 512) == 0 and check_logprobs(np.int64(MAX_LOGPROBS), 512) == 20
    assert check_logprobs(8, 8) == 8
    for bad, vocab in ((True, 512), (-1, 512), (21, 512), (9, 8), (1.0, 512), ("3", 512)):
        with pytest.raises(OptionError, match="logprobs must be None or an integer in"):
            check_logprobs(bad, vocab)


# ---------------------------------------------------------------- generate(logprobs=n)

PROMPTS = [[1, 403, 407, 261], [1, 66]]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generate_records_the_logprob_of_each_chosen_id(stories, sampled):
    model, _ = stories
    settings = dict(temperature=0.9, top_k=20, repetition_penalty=1.3) if sampled else {}
    options = dict(ids=PROMPTS, max_new_tokens=6, eos_ids=(), seed=[3, 4], backend="numpy")
    out = slimllm.generate(model, return_logits=True, logprobs=3, **options, **settings)
    plain = slimllm.generate(model, **options, **settings)
    assert out.ids == plain.ids, "recording logprobs changed the tokens"
    for ids, logits, steps in zip(out.ids, out.logits, out.logprobs, strict=True):
        assert len(steps) == len(ids) and all(isinstance(s, TokenLogprob) for s in steps)
        want = direct_log_softmax(logits)  # [n,v]: the raw logits that chose each id
        got = np.array([s.logprob for s in steps])
        assert_close(got, want[np.arange(len(ids)), ids], TOL, "chosen")
        for step, (token, s) in enumerate(zip(ids, steps, strict=True)):
            assert [i for i, _ in s.top] == np.argsort(-want[step], kind="stable")[:3].tolist()
            if not sampled:  # greedy without a penalty: the chosen id is the most likely
                assert s.top[0] == (token, s.logprob)


def test_generate_without_logprobs_records_none_and_bad_values_are_refused(stories):
    model, _ = stories
    out = slimllm.generate(model, ids=[1], max_new_tokens=2, backend="numpy")
    assert out.logprobs == []
    zero = slimllm.generate(model, ids=[1], max_new_tokens=2, backend="numpy", logprobs=0)
    assert [s.top for s in zero.logprobs[0]] == [(), ()]
    for bad in (True, -1, 21, 2.0):
        with pytest.raises(OptionError, match="logprobs must be"):
            slimllm.generate(model, ids=[1], max_new_tokens=2, backend="numpy", logprobs=bad)
    with pytest.raises(OptionError, match="need mode='stream'"):
        slimllm.generate(model, ids=[1], max_new_tokens=2, backend="numpy", logprobs=0, mode="loop")
