"""Logits processors against hand-computed cases (HF generate() semantics), and the RNG."""

import numpy as np
import pytest

from slimllm.reference import sampling
from slimllm.reference.errors import OptionError
from slimllm.reference.sampling import GREEDY_BELOW, SamplingConfig

NEG = -np.inf


def test_repetition_penalty_hf_rule():
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], np.float32)
    seen = np.array([[True, True, False, False]])
    out = sampling.repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0]])


def test_top_k_keeps_ties():
    logits = np.array([[1.0, 3.0, 2.0, 2.0, 0.0]], np.float32)
    np.testing.assert_array_equal(sampling.top_k_filter(logits, 2), [[NEG, 3.0, 2.0, 2.0, NEG]])


def test_top_p_keeps_the_crossing_token():
    # probabilities 0.5, 0.3, 0.15, 0.05: p = 0.7 needs 0.5 + 0.3 (crosses 0.7) -> keep two
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = np.log(probs).astype(np.float32)
    out = sampling.top_p_filter(logits, 0.7)
    assert np.isfinite(out).tolist() == [[False, True, False, True]]
    # p = 0.81: the top two hold 0.8 < 0.81, so the third (0.15) crosses p and is kept
    out = sampling.top_p_filter(logits, 0.81)
    assert np.isfinite(out).tolist() == [[False, True, True, True]]


def test_min_p_relative_to_top_probability():
    probs = np.array([[0.6, 0.25, 0.1, 0.05]])
    out = sampling.min_p_filter(np.log(probs).astype(np.float32), 0.2)  # threshold 0.12
    assert np.isfinite(out).tolist() == [[True, True, False, False]]


def test_temperature_then_filters_order():
    logits = np.array([[4.0, 2.0, 0.0]], np.float32)
    sc = SamplingConfig(temperature=2.0, top_k=2)
    np.testing.assert_allclose(
        sampling.process(logits, sc, np.zeros((1, 3), bool)), [[2.0, 1.0, NEG]]
    )


def test_greedy_lowest_id_on_ties_and_penalty_applies():
    logits = np.array([[1.0, 3.0, 3.0]], np.float32)
    assert sampling.sample(logits, SamplingConfig(), np.zeros((1, 3), bool), [0], 0)[0] == 1
    seen = np.array([[False, True, False]])
    sc = SamplingConfig(repetition_penalty=1.5)
    assert sampling.sample(logits, sc, seen, [0], 0)[0] == 2


def test_uniform_is_a_pure_function_of_seed_and_step():
    u = sampling.uniform([1, 2, 1], 5)
    assert u[0] == u[2] and u[0] != u[1]
    assert np.all((0 <= u) & (u < 1))
    assert sampling.uniform([1], 5)[0] == u[0]
    assert sampling.uniform([1], 6)[0] != u[0]
    many = sampling.uniform(np.arange(20000), 0)
    assert abs(many.mean() - 0.5) < 0.01 and abs((many < 0.1).mean() - 0.1) < 0.01


def test_threefry_known_answer():
    """Threefry-2x32-20 test vector of the Random123 distribution (key = counter = 0)."""
    x0, x1 = sampling.threefry2x32(np.uint32(0), np.uint32(0), np.uint32(0), np.uint32(0))
    assert (int(x0), int(x1)) == (0x6B200159, 0x99BA4EFE)


def test_choose_follows_the_distribution_and_never_picks_excluded():
    scores = np.array([[np.log(0.5), np.log(0.25), np.log(0.25), -np.inf]], np.float32)
    counts = np.zeros(4)
    for step in range(4000):
        counts[sampling.choose(scores, sampling.uniform([7], step))[0]] += 1
    assert counts[3] == 0
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.25, 0.25, 0], atol=0.03)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(temperature=-1), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
        (dict(temperature="1"), "temperature must be a finite number"),
        (dict(temperature=1e300), "temperature must be a finite float32 number"),
        (dict(repetition_penalty=1e39), "repetition_penalty must be a finite float32 number"),
        (dict(repetition_penalty=1e-300), "repetition_penalty must be a finite float32 number"),
        (dict(top_p=1e-300), "top_p must be a finite float32 number"),
        (dict(temperature=True), "temperature must be a finite number"),
        (dict(top_p=0.0), r"top_p must be a finite number in \(0, 1\]"),
        (dict(top_p=1.5), "top_p must be"),
        (dict(top_p=float("nan")), "top_p must be"),
        (dict(min_p=2.0), r"min_p must be a finite number in \[0, 1\]"),
        (dict(min_p=float("nan")), "min_p must be"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=2.5), "top_k must be an integer >= 0, got 2.5"),
        (dict(top_k=True), "top_k must be an integer"),
        (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be"),
        (dict(repetition_penalty=float("-inf")), "repetition_penalty must be"),
    ],
)
def test_bad_settings_are_rejected_by_name(bad, message):
    with pytest.raises(OptionError, match=message):
        SamplingConfig(**bad)


def test_numpy_numbers_are_settings_equal_to_python_ones():
    """A setting is a static jit argument: NumPy scalars are stored as the Python numbers."""
    a = SamplingConfig(np.float32(0.5), np.int64(3), np.float64(0.9))
    b = SamplingConfig(0.5, 3, 0.9)
    assert a == b and hash(a) == hash(b) and type(a.top_k) is int


def test_tiny_temperatures_are_greedy():
    """Below GREEDY_BELOW sampling is argmax, whatever the seed: the one limit both backends
    (which read `greedy`) share, instead of scores at the edge of float32."""
    logits = np.array([[1.0, 3.0, 2.999, -5.0]], np.float32)
    seen = np.zeros((1, 4), bool)
    for temperature in (0.0, 1e-30, GREEDY_BELOW / 2):
        sc = SamplingConfig(temperature=temperature)
        assert sc.greedy
        assert [sampling.sample(logits, sc, seen, [s], 0)[0] for s in range(20)] == [1] * 20
    assert not SamplingConfig(temperature=GREEDY_BELOW).greedy
    drawn = {int(sampling.sample(logits, SamplingConfig(1.0), seen, [s], 0)[0]) for s in range(40)}
    assert {1, 2} <= drawn  # at temperature 1 the near-tie is drawn too
