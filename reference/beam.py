"""Beam search: the `num_beams` highest-scoring continuations of each prompt, with Hugging Face
transformers' semantics (`generate(num_beams=..., length_penalty=..., early_stopping=...)`, the
vectorised beam search of transformers 5).

Each prompt row is prefilled once and its cache copied to its m beams. Every step scores all
m x v continuations of a row: log_softmax of the raw logits, then the processors (HF applies
them to the log-probabilities: the repetition penalty multiplies the log-probability of every
id in the beam's own prompt and output by p), plus the beam's running sum. The best
K = max(2, 1 + number of EOS ids) x m candidates are kept (ties: lowest beam, then lowest id).
A candidate ending in EOS, or reaching max_new_tokens, is closed: it may join the row's m
finished hypotheses (only if among the first m of the K), scored sum / n ** length_penalty,
n its new ids counting the last one. The m best open candidates run on, and the cache rows
are reordered to their parents (`reorder`: every layer, values and int8 scales alike).

A row stops changing when its m hypothesis slots are full and its best running sum divided by
L ** length_penalty cannot beat the worst of them (L: ids so far; with early_stopping="never"
and a positive length penalty, max_new_tokens); with early_stopping=True also as soon as its
slots are full. The search ends when every row has stopped, or at max_new_tokens. A row's
result is its best hypothesis (`BeamGeneration`: ids, "eos" or "length", score, and every
finished hypothesis). The JAX backend's `beam.py` runs the same `step` on its host copy of
the logits, so both backends choose the same ids.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import kv_cache, positions
from .config import ModelConfig
from .errors import OptionError, shown
from .generate import GenerateResult, Generation, Stopping, check_request, decode, prefill
from .ops import log_softmax
from .params import Params
from .runtime import Runtime
from .sampling import SamplingConfig, is_integer, repetition_penalty

NEG = np.float32(-1e9)  # HF's score of an empty hypothesis slot, and its mask for closed ones
MAX_BEAMS = 256  # beams are batch rows (m x the cache, m x v scores a step): a bound on mistakes


@dataclass(frozen=True)
class BeamConfig:
    """Beam search settings (HF names and defaults), checked by name when made."""

    num_beams: int = 1  # in [1, MAX_BEAMS]
    length_penalty: float = 1.0  # hypothesis score = sum of log-probs / n ** length_penalty
    early_stopping: bool | str = False  # True, False or "never" (module docstring)

    def __post_init__(self):
        m = self.num_beams
        if not is_integer(m) or not 1 <= m <= MAX_BEAMS:
            raise OptionError(f"num_beams must be an integer in [1, {MAX_BEAMS}], got {shown(m)}")
        penalty = self.length_penalty
        if not isinstance(penalty, numbers.Real) or isinstance(penalty, bool | np.bool_):
            raise OptionError(f"length_penalty must be a finite number, got {shown(penalty)}")
        if not math.isfinite(penalty):
            raise OptionError(f"length_penalty must be a finite number, got {shown(penalty)}")
        early = self.early_stopping
        if not (
            isinstance(early, bool | np.bool_) or (isinstance(early, str) and early == "never")
        ):
            raise OptionError(f"early_stopping must be True, False or 'never', got {shown(early)}")
        object.__setattr__(self, "early_stopping", early if isinstance(early, str) else bool(early))
        object.__setattr__(self, "num_beams", int(self.num_beams))
        object.__setattr__(self, "length_penalty", float(penalty))


def check_beam_request(stopping: Stopping, sampling: SamplingConfig) -> None:
    """Beam search is deterministic and stops on EOS ids and length only: sampling settings,
    stop sequences and stop strings are refused by name (the repetition penalty is allowed)."""
    default = SamplingConfig()
    for name in ("temperature", "top_k", "top_p", "min_p"):
        if getattr(sampling, name) != getattr(default, name):
            raise OptionError(
                f"{name} is a sampling setting: beam search (num_beams > 1) is deterministic, "
                f"leave {name} at its default {getattr(default, name)!r}"
            )
    if stopping.stop_sequences or stopping.stop_strings:
        raise OptionError("stop (strings or id sequences) is not supported with num_beams > 1")


@dataclass
class BeamGeneration(Generation):
    """A row's best hypothesis (as `Generation`), its score, and every finished hypothesis
    (ids, score), best first."""

    score: float = 0.0
    hypotheses: list = field(default_factory=list)


@dataclass
class Beams:
    """The search of b prompt rows x m beams, on the host: running beams and finished slots."""

    scores: np.ndarray  # [b,m] float32 running sums of log-probs, best first
    ids: np.ndarray  # [b,m,n] int64 new ids of the running beams
    seen: np.ndarray  # [b*m,v] bool: ids in each beam's prompt and output (repetition penalty)
    done_scores: np.ndarray  # [b,m] float32 finished hypotheses' scores (NEG: empty slot)
    done_ids: list  # [b][m] list of ids of each finished hypothesis
    done: np.ndarray  # [b,m] bool: the slot holds a finished hypothesis
    open: np.ndarray  # [b] bool: a running beam may still beat the row's worst hypothesis


def start(prompts, m: int, vocab: int) -> Beams:
    """Before the first step: beam 0 of each row scores 0, the others NEG (so the first step
    expands one beam, not m copies of it)."""
    b = len(prompts)
    scores = np.zeros((b, m), np.float32)
    scores[:, 1:] = NEG
    seen = np.zeros((b * m, vocab), bool)
    for r, p in enumerate(prompts):
        seen[r * m : (r + 1) * m, p] = True
    return Beams(
        scores,
        np.zeros((b, m, 0), np.int64),
        seen,
        np.full((b, m), NEG, np.float32),
        [[[] for _ in range(m)] for _ in range(b)],
        np.zeros((b, m), bool),
        np.ones(b, bool),
    )


def step(beams: Beams, logits, n: int, bc: BeamConfig, stopping: Stopping, penalty: float):
    """Choose the next id of every beam from their raw logits [b*m,v] after n new ids ->
    (beams, parent rows [b*m] of the cache, ids [b*m], whether the search has ended)."""
    b, m = beams.scores.shape
    v = logits.shape[-1]
    logp = log_softmax(np.asarray(logits, np.float32))  # [b*m,v]
    logp = repetition_penalty(logp, beams.seen, penalty)  # HF: processors after log_softmax
    total = (logp.reshape(b, m, v) + beams.scores[:, :, None]).reshape(b, m * v)  # [b,m*v]
    k = max(2, 1 + len(stopping.eos_ids)) * m
    top = np.argsort(-total, axis=-1, kind="stable")[:, :k]  # [b,k] best first, ties: low index
    cand = np.take_along_axis(total, top, axis=-1)  # [b,k] running sum of each candidate
    parent, token = top // v, top % v  # [b,k] beam within the row, new id
    closed = np.isin(token, stopping.eos_ids) | (n + 1 >= stopping.max_new_tokens)  # [b,k]

    # the m best open candidates run on (if fewer are open, closed ones fill in, masked)
    masked = cand + closed.astype(np.float32) * NEG  # [b,k]
    keep = np.argsort(-masked, axis=-1, kind="stable")[:, :m]  # [b,m]
    keep_parent = np.take_along_axis(parent, keep, axis=-1)  # [b,m]
    keep_token = np.take_along_axis(token, keep, axis=-1)  # [b,m]
    ids = np.take_along_axis(beams.ids, keep_parent[:, :, None], axis=1)  # [b,m,n]
    ids = np.concatenate([ids, keep_token[:, :, None]], axis=-1)  # [b,m,n+1]
    rows = (np.arange(b)[:, None] * m + keep_parent).reshape(-1)  # [b*m] parent cache rows
    seen = beams.seen[rows]
    seen[np.arange(b * m), keep_token.reshape(-1)] = True

    # closed candidates among the first m join the finished slots if they score high enough
    score = per_length(cand, n + 1, bc.length_penalty)  # [b,k]
    full = beams.done.all(axis=-1) & (bc.early_stopping is True)  # [b]
    score += full[:, None].astype(np.float32) * NEG
    score += (~beams.open)[:, None].astype(np.float32) * NEG
    finishing = closed & (np.arange(k) < m)[None, :]  # [b,k]
    score += (~finishing).astype(np.float32) * NEG
    merged = np.concatenate([beams.done_scores, score], axis=-1)  # [b,m+k]
    best = np.argsort(-merged, axis=-1, kind="stable")[:, :m]  # [b,m] old slots first on ties
    done_ids = []
    for r in range(b):
        slots = []
        for j in best[r]:
            if j < m:
                slots.append(beams.done_ids[r][j])
            else:
                c = j - m
                slots.append([*beams.ids[r, parent[r, c]].tolist(), int(token[r, c])])
        done_ids.append(slots)
    done_scores = np.take_along_axis(merged, best, axis=-1)
    done = np.take_along_axis(np.concatenate([beams.done, finishing], -1), best, axis=-1)

    # can a running beam still beat the worst finished hypothesis? (HF's heuristic)
    running_scores = np.take_along_axis(masked, keep, axis=-1)  # [b,m] best first
    longer = bc.early_stopping == "never" and bc.length_penalty > 0  # longer is better then
    hoped = stopping.max_new_tokens if longer else n + 1  # the length a running beam may reach
    best_running = per_length(running_scores[:, 0], hoped, bc.length_penalty)  # [b]
    worst = np.where(done, done_scores.min(axis=-1, keepdims=True), NEG)  # [b,m]
    still_open = beams.open & np.any(best_running[:, None] > worst, axis=-1)
    beams = Beams(running_scores, ids, seen, done_scores, done_ids, done, still_open)
    stopped = ~still_open | (done.all(axis=-1) & (bc.early_stopping is True))
    ended = bool(stopped.all()) or n + 1 >= stopping.max_new_tokens
    return beams, rows, keep_token.reshape(-1), ended


def per_length(sums, n: int, length_penalty: float):
    """sums / n ** length_penalty in float32, the power in float64 (HF's Python arithmetic);
    past float32's range the power is inf or 0, and the scores -0 or -inf, still ordered."""
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        return sums / np.float32(np.float64(n) ** length_penalty)


def results(beams: Beams, stopping: Stopping) -> list[BeamGeneration]:
    """Each row's best finished hypothesis, with all of them. A slot still empty at the end
    (score NEG) is left out; only scores below NEG leave a row with none (n ** length_penalty
    beyond float32), and then its result is its best running beam, scored -inf."""
    rows = []
    for r, slots in enumerate(beams.done_ids):
        hypotheses = [
            (list(map(int, ids)), float(s))
            for ids, s, done in zip(slots, beams.done_scores[r], beams.done[r])
            if done
        ]
        ids, score = hypotheses[0] if hypotheses else (beams.ids[r, 0].tolist(), -np.inf)
        reason = "eos" if ids and ids[-1] in stopping.eos_ids else "length"
        rows.append(BeamGeneration(ids, reason, score=score, hypotheses=hypotheses))
    return rows


def tell(rows: list[BeamGeneration], on_token) -> None:
    """`on_token(row, id)` for each id of each row's result, rows in order."""
    for r, row in enumerate(rows):
        for token in row.ids if on_token else ():
            on_token(r, token)


def expand(state: positions.SeqState, rows) -> positions.SeqState:
    """The state of the cache rows `rows` (each beam of a prompt row has its row's state)."""
    return positions.SeqState(
        **{f.name: getattr(state, f.name)[rows] for f in dataclasses.fields(state)}
    )


def reorder(cache: kv_cache.KVCache, rows) -> kv_cache.KVCache:
    """The cache whose row i is row rows[i] of `cache`, in every layer: keys, values and, in a
    scaled format, their per-token scales (which belong to the values they scale)."""
    out = {}
    for name in ("k", "v", "k_scale", "v_scale"):
        layers = getattr(cache, name)
        out[name] = None if layers is None else tuple(x[rows] for x in layers)  # [b,...] -> [n,...]
    return dataclasses.replace(cache, **out)


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    stopping: Stopping,
    beam: BeamConfig,
    sampling: SamplingConfig = SamplingConfig(),
    on_token: Callable[[int, int], None] | None = None,
    rt: Runtime = Runtime(backend="numpy"),
) -> GenerateResult:
    """Beam search from each prompt -> each row's best hypothesis; `on_token(row, id)` is
    called for its ids once the search has ended (no id is final before)."""
    prompts, _, length = check_request(cfg, prompts, stopping, 0, rt.cache_len)
    check_beam_request(stopping, sampling)
    b, m = len(prompts), beam.num_beams
    t0 = time.perf_counter()
    cache = kv_cache.init_cache(cfg, b, length, rt.kv_dtype)
    logits, cache, state = prefill(params, cfg, prompts, cache, rt)  # [b,v]
    t1 = time.perf_counter()
    rows = np.repeat(np.arange(b), m)  # [b*m]: beam j of prompt row r is cache row r*m + j
    cache, state, logits = reorder(cache, rows), expand(state, rows), logits[rows]
    beams = start(prompts, m, cfg.vocab)
    steps = 0
    for n in range(stopping.max_new_tokens):
        beams, parents, ids, ended = step(
            beams, logits, n, beam, stopping, sampling.repetition_penalty
        )
        if ended:
            break
        cache = reorder(cache, parents)
        logits, cache, state = decode(params, cfg, ids, cache, state, rt)
        steps += 1
    out = results(beams, stopping)
    t2 = time.perf_counter()
    tell(out, on_token)
    return GenerateResult(out, t1 - t0, t2 - t1, steps)
