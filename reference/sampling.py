"""Choosing the next token: logits processors with Hugging Face semantics and a seeded sampler.

Order and rules follow `transformers` generate(): repetition penalty (score < 0 ? score * p :
score / p over every id in the prompt and the output so far), then temperature, top-k (ties with
the k-th value are kept), top-p (sort ascending, drop tokens whose cumulative probability is
<= 1 - p, so the token that crosses p is kept), min-p (drop probabilities < min_p * max). Greedy
is argmax after the penalty (lowest id on ties).

Randomness is counter-based: the uniform number of row r at step n is a pure function of
(seed_r, n), from the Threefry-2x32 block cipher (20 rounds, uint32 add/rotate/xor only). The
JAX backend computes the same bits with the same formula, so the same seed gives the same
tokens in both backends, and a row gives the same tokens alone or in a batch.

Temperatures below `GREEDY_BELOW` are greedy in both backends: logits divided by a vanishing
temperature reach the edge of float32 (1e-30 gives scores near 1e31, and inf soon after), where
XLA's and NumPy's softmax round differently and the two backends drew different tokens. The
limit of sampling as the temperature falls is argmax; at 1e-5 a logit gap of 1e-4 (float32
rounding of logits near 1000) already makes the runner-up e^-10 times less likely than the best.
Options are checked here by name (numbers, finite, in range), for both backends.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .errors import OptionError
from .ops import softmax

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (argmax), in both backends
FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_integer(value) -> bool:
    """An int or NumPy integer; bools are not counted (True is not a token id or a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def number(name: str, value, low: float, high: float = math.inf, low_open=False) -> float:
    """`value` as a float if it is a finite real number from `low` (excluded if `low_open`) to
    `high`, else an OptionError naming the option."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    above = real and (low < value if low_open else low <= value)
    if not (above and value <= high and math.isfinite(value)):
        if high == math.inf:
            span = f"{'>' if low_open else '>='} {low:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise OptionError(f"{name} must be a finite number {span}, got {value!r}")
    if abs(value) > FLOAT32_MAX or (low_open and np.float32(value) <= low):  # inf or 0 there
        raise OptionError(
            f"{name} must be a finite float32 number (<= 3.4e38, > 0 if positive), got {value!r}"
        )
    return float(value)


@dataclass(frozen=True)
class SamplingConfig:
    """The processors' settings (their rules: the module docstring), each checked by name when
    made and stored as a Python number, so that equal settings hash equal; each default turns
    its processor off."""

    temperature: float = 0.0  # below GREEDY_BELOW (0 included): greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    def __post_init__(self):
        # stored as Python numbers, so equal settings hash equal (a static argument under jit)
        if not is_integer(self.top_k) or self.top_k < 0:
            raise OptionError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        checked = {
            "temperature": number("temperature", self.temperature, 0.0),
            "top_k": int(self.top_k),
            "top_p": number("top_p", self.top_p, 0.0, 1.0, low_open=True),
            "min_p": number("min_p", self.min_p, 0.0, 1.0),
            "repetition_penalty": number(
                "repetition_penalty", self.repetition_penalty, 0.0, low_open=True
            ),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        """Argmax after the penalty, no draw: the temperature is below GREEDY_BELOW."""
        return self.temperature < GREEDY_BELOW


# ---------------------------------------------------------------- counter-based RNG

ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
PARITY = np.uint32(0x1BD11BDA)


def rotl(x, r):
    """Each uint32 of x rotated left by r bits."""
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key0, key1, x0, x1):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011): a keyed bijection of two uint32 words."""
    with np.errstate(over="ignore"):
        ks = (key0, key1, key0 ^ key1 ^ PARITY)
        x0, x1 = x0 + ks[0], x1 + ks[1]
        for block in range(5):
            for r in ROTATIONS[(block % 2) * 4 : (block % 2) * 4 + 4]:
                x0 = x0 + x1
                x1 = rotl(x1, r) ^ x0
            x0 = x0 + ks[(block + 1) % 3]
            x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def uniform(seeds, step: int):
    """One float32 in [0, 1) per row: a pure function of (seed of the row, step)."""
    seeds = np.asarray(seeds, np.int64)
    key0 = (seeds & 0xFFFFFFFF).astype(np.uint32)
    key1 = ((seeds >> 32) & 0xFFFFFFFF).astype(np.uint32)
    x0, _ = threefry2x32(key0, key1, np.full_like(key0, step, np.uint32), np.zeros_like(key0))
    return (x0 >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


# ---------------------------------------------------------------- processors


def repetition_penalty(logits, seen, penalty: float):
    """HF rule on seen ids ([b,v] bool): negative scores * penalty, positive / penalty."""
    if penalty == 1.0:
        return logits
    p = np.float32(penalty)
    penalised = np.where(logits < 0, logits * p, logits / p)
    return np.where(seen, penalised, logits)


def top_k_filter(logits, top_k: int):
    """Keep scores >= the top_k-th largest of each row (ties kept), -inf elsewhere."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = -np.sort(-logits, axis=-1)[:, top_k - 1 : top_k]  # [b,v] -> [b,1]
    return np.where(logits < kth, -np.inf, logits).astype(np.float32)


def top_p_filter(logits, p: float):
    """Keep the smallest top set whose probability reaches p (the crossing token kept)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending
    sorted_logits = np.take_along_axis(logits, order, axis=-1)  # [b,v], ascending per row
    cum = np.cumsum(softmax(sorted_logits, axis=-1), axis=-1)  # [b,v]
    drop_sorted = cum <= np.float32(1.0 - p)
    drop_sorted[:, -1] = False  # always keep the best token
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits).astype(np.float32)


def min_p_filter(logits, min_p: float):
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits, axis=-1)
    threshold = np.float32(min_p) * probs.max(axis=-1, keepdims=True)  # [b,v] -> [b,1]
    return np.where(probs < threshold, -np.inf, logits).astype(np.float32)


def process(logits, sc: SamplingConfig, seen):
    """All processors in HF order: [b,v] raw logits -> [b,v] scores (-inf = excluded)."""
    logits = repetition_penalty(logits.astype(np.float32), seen, sc.repetition_penalty)
    if sc.greedy:
        return logits
    logits = logits / np.float32(sc.temperature)
    logits = top_k_filter(logits, sc.top_k)
    logits = top_p_filter(logits, sc.top_p)
    return min_p_filter(logits, sc.min_p)


def choose(scores, u):
    """Inverse-CDF draw in token-id order: the first id whose cumulative probability exceeds
    u * total. Id order (not score order) keeps the draw stable under last-bit differences
    between backends or batch shapes: near-equal scores cannot swap places."""
    probs = softmax(scores, axis=-1)  # [b,v]
    cum = np.cumsum(probs, axis=-1)  # [b,v]
    idx = np.sum(cum <= u[:, None] * cum[:, -1:], axis=-1)  # [b,v] <= [b,1] -> [b]
    # never a token of probability 0, even if rounding points past the last possible one
    last = scores.shape[-1] - 1 - np.argmax((probs > 0)[:, ::-1], axis=-1)  # [b,v] -> [b]
    return np.minimum(idx, last)


def sample(logits, sc: SamplingConfig, seen, seeds, step: int):
    """Next token per row [b] from raw logits [b,v]."""
    scores = process(logits, sc, seen)
    if sc.greedy:
        return np.argmax(scores, axis=-1)  # [b,v] -> [b]
    return choose(scores, uniform(seeds, step))
