"""Log-probabilities of generated tokens: the model's own, from its raw logits.

For each row, log_softmax of the raw logits [b, v] (the model's output, before repetition
penalty, temperature and filters: the distribution the model gives, which vLLM reports by default
and OpenAI's API returns as `logprobs`), read at the chosen id, and the n most likely ids with
their logprobs. In float32, max-subtracted: log p_i = (x_i - m) - log sum_j exp(x_j - m), with
m = max_j x_j, so no exp overflows. The n alternatives are ranked by logit, which orders them as
their logprobs (x - m - lse is monotone in x), ties to the lowest id.

The JAX backend's `logprobs.py` computes the same from its vocabulary slice under tensor
parallelism (m and the sum of exps reduced across ranks, the top-n from each rank's own top-n),
with the same tie rule. `generate(logprobs=n)` records one `TokenLogprob` per generated token.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

import numpy as np

from .errors import OptionError
from .sampling import is_integer

MAX_LOGPROBS = 20  # alternatives per token at most, as OpenAI's top_logprobs and vLLM's default


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and the top-n alternatives [(id, logprob), ...] (the
    chosen id among them when it is in the top n), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def check_logprobs(n, vocab: int) -> int | None:
    """`n` alternatives per token: None (off) or an integer in [0, min(MAX_LOGPROBS, vocab)]
    (bools refused), else an OptionError naming `logprobs`."""
    if n is None:
        return None
    high = min(MAX_LOGPROBS, vocab)
    if not is_integer(n) or not 0 <= n <= high:
        raise OptionError(
            f"logprobs must be None or an integer in [0, {high}] (alternatives per token, at "
            f"most {MAX_LOGPROBS} and the vocabulary), got {reprlib.repr(n)}"
        )
    return int(n)


def log_softmax(logits):
    """log p = (x - m) - log sum exp(x - m) per row, float32: [b,v] -> [b,v]."""
    x = logits.astype(np.float32)
    z = x - np.max(x, axis=-1, keepdims=True)  # [b,v] - [b,1]
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))  # [b,v] - [b,1]


def top_ids(logits, n: int):
    """The n largest logits' ids per row, largest first, ties to the lowest id: [b,v] -> [b,n]."""
    order = np.argsort(-logits.astype(np.float32), axis=-1, kind="stable")  # stable: low id first
    return order[:, :n].astype(np.int32)


def token_logprobs(logits, ids, n: int):
    """(logprob of ids [b], top-n ids [b,n] int32, their logprobs [b,n]) from raw logits [b,v]."""
    logp = log_softmax(logits)  # [b,v]
    chosen = logp[np.arange(logits.shape[0]), np.asarray(ids)]  # [b,v] -> [b]
    top = top_ids(logits, n)  # [b,v] -> [b,n]
    return chosen, top, np.take_along_axis(logp, top, axis=-1)  # [b], [b,n], [b,n]


def per_row(chosen, top, top_logprobs) -> list[TokenLogprob]:
    """Host arrays of one step ([b], [b,n], [b,n]) -> one TokenLogprob per row."""
    return [
        TokenLogprob(
            float(chosen[r]),
            tuple((int(i), float(lp)) for i, lp in zip(top[r], top_logprobs[r], strict=True)),
        )
        for r in range(len(chosen))
    ]
