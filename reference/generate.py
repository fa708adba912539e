"""Generation: prefill a batch of prompts, then one decode step per token, in a plain loop.

Prompts of different lengths share one padded prefill: row r writes its L_r real tokens to cache
slots 0..L_r-1 (pad tokens after them are written too but are never visible to a real query,
being in its future) and reads its first logits at L_r - 1. Each decode step writes row r's new
token at slot `lengths[r]`, overwriting padding, so every row computes exactly what it would
alone. Stopping: max new tokens, EOS ids, stop token sequences, stop strings (HF semantics: the
stop token is part of the output). With `logprobs=n` each generated token also gets the
model's log-probability and its top-n alternatives (logprobs.py). The JAX backend's `generate`
has the same contract, and both check a request with the same functions (`Stopping`,
`SamplingConfig`, `check_request`, `check_logprobs`): ids are integers (Python or NumPy, never
bools, floats or strings), options numbers in range, each failure an `OptionError` naming the
option.
"""

from __future__ import annotations

import reprlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import kv_cache, positions
from .config import ModelConfig
from .errors import OptionError
from .logprobs import check_logprobs, per_row, token_logprobs
from .model import forward
from .params import Params
from .runtime import Runtime
from .sampling import SamplingConfig, is_integer, sample


@dataclass
class Generation:
    """One row's result: its new ids (the one that stopped it included) and why it stopped."""

    ids: list[int]  # generated ids only
    finish_reason: str  # "length" | "eos" | "stop"
    logits: list = field(default_factory=list)  # raw logits [v] that produced each id, if asked
    logprobs: list = field(default_factory=list)  # a logprobs.TokenLogprob per id, if asked


@dataclass
class GenerateResult:
    """Every row's `Generation`, and the timings: prefill (the prompts, to their first logits),
    decode (choosing every id and the decode steps between), the decode steps run."""

    rows: list[Generation]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    compile_seconds: float = 0.0  # JAX backend: compilation, kept out of the timings above


@dataclass
class Stopping:
    """When a row stops (`reason`), checked when made: after `max_new_tokens` ids, on one of
    `eos_ids`, when its ids end with one of `stop_sequences`, or when its ids decoded (`decode`,
    needed for these) contain one of `stop_strings`."""

    max_new_tokens: int = 64
    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None  # needed for stop strings

    def __post_init__(self):
        n = self.max_new_tokens
        if not is_integer(n) or n < 1:
            raise OptionError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        self.max_new_tokens = int(n)
        self.eos_ids = tuple(token_ids(self.eos_ids, "eos_ids"))
        self.stop_sequences = tuple(tuple(token_ids(s, "stop")) for s in self.stop_sequences)
        for text in self.stop_strings:
            if not isinstance(text, str):
                raise OptionError(f"stop strings must be str, got {reprlib.repr(text)}")
        if self.stop_strings and self.decode is None:
            raise OptionError("stop strings need a tokenizer to decode the output")

    def reason(self, ids: list[int]) -> str | None:
        """Why generation of a row stops after its latest id, or None to continue."""
        if ids[-1] in self.eos_ids:
            return "eos"
        for seq in self.stop_sequences:
            if len(seq) and tuple(ids[-len(seq) :]) == tuple(seq):
                return "stop"
        if self.stop_strings:
            text = self.decode(ids)
            if any(stop in text for stop in self.stop_strings):
                return "stop"
        if len(ids) >= self.max_new_tokens:
            return "length"
        return None


def token_ids(values, name: str) -> list[int]:
    """`values` as a list of Python ints, each an integer >= 0 (a Python or NumPy integer: a
    float, string or bool is refused, never truncated), else an OptionError naming `name`."""
    if isinstance(values, str | bytes):
        raise OptionError(f"{name} must be a sequence of token ids, got {reprlib.repr(values)}")
    try:
        values = list(values)
    except TypeError:
        raise OptionError(
            f"{name} must be a sequence of token ids, got {reprlib.repr(values)}"
        ) from None
    bad = [t for t in values if not is_integer(t) or t < 0]
    if bad:
        raise OptionError(f"{name} must be token ids (integers >= 0), got {reprlib.repr(bad[0])}")
    return [int(t) for t in values]


SEED_RANGE = (-(2**63), 2**64)  # a 64-bit Threefry key; a negative seed is the key seed + 2**64


def seed_array(seeds, b: int) -> np.ndarray:
    """One seed per row [b] as int64 (the key's two 32-bit words in two's complement): `seeds`
    is one integer for every row or one per row, each in SEED_RANGE."""
    low, high = SEED_RANGE
    what = "seed must be an integer in [-2**63, 2**64)"
    rows = [seeds] * b if is_integer(seeds) else seeds
    if isinstance(rows, str | bytes) or not hasattr(rows, "__len__") or len(rows) != b:
        raise OptionError(f"{what} or a list of {b}, one per row, got {reprlib.repr(seeds)}")
    bad = [s for s in rows if not is_integer(s) or not low <= s < high]
    if bad:
        raise OptionError(f"{what}, got {reprlib.repr(bad[0])}")
    return np.array([int(s) - 2**64 if s >= 2**63 else int(s) for s in rows], np.int64)


def check_request(cfg: ModelConfig, prompts, stopping: Stopping, seeds, cache_len: int | None):
    """The one check of a generation request, in both backends -> (prompts as lists of ids
    inside the vocabulary, seeds [b] int64, the cache length to allocate)."""
    if isinstance(prompts, str | bytes) or not hasattr(prompts, "__iter__"):
        raise OptionError(f"prompts must be a list of token-id lists, got {reprlib.repr(prompts)}")
    prompts = [token_ids(p, "ids") for p in prompts]
    length = check_prompts(cfg, prompts, stopping.max_new_tokens, cache_len)
    return prompts, seed_array(seeds, len(prompts)), length


MODES = ("loop", "stream")  # the JAX backend's two forms (its module docstring)


def check_mode(
    mode: str | None, stopping: Stopping, on_token, return_logits: bool, logprobs=None
) -> str:
    """The generation form (None: stream when the host must see each token, else loop), checked
    alike for both backends, though the reference has only its one loop. Logprobs (any n, 0
    included) are read per token, as the logits are."""
    host_needed = bool(on_token or stopping.stop_strings or return_logits) or logprobs is not None
    if mode is None:
        return "stream" if host_needed else "loop"
    if not isinstance(mode, str) or mode not in MODES:
        raise OptionError(f"unknown generation mode {mode!r}: expected one of {MODES}")
    if mode == "loop" and host_needed:
        raise OptionError(
            "callbacks, stop strings and logits need mode='stream' (logits: return_logits, "
            "logprobs)"
        )
    return mode


def check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int, cache_len: int | None) -> int:
    """Validate prompts (lists of ints) and return the cache length to allocate."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise OptionError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    for p in prompts:
        bad = [token for token in p if not 0 <= int(token) < cfg.vocab]
        if bad:
            raise OptionError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab})")
    need = longest + max_new_tokens
    if longest > cfg.max_len:
        raise OptionError(
            f"prompt of {longest} tokens is longer than the model's context {cfg.max_len}"
        )
    if need > cfg.max_len:
        raise OptionError(
            f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {need} exceeds the model's "
            f"context {cfg.max_len}"
        )
    if cache_len is not None and cache_len > cfg.max_len:  # slots no position could fill
        raise OptionError(f"cache_len {cache_len} exceeds the model's context {cfg.max_len}")
    if cache_len is not None and need > cache_len:
        raise OptionError(
            f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {need} "
            f"is longer than the cache ({cache_len})"
        )
    positions.start_state(cfg, prompts)  # a prefix-LM prompt needs its block start token
    return cache_len or need


def pad(prompts, pad_id: int = 0) -> np.ndarray:
    """Right-pad ragged prompts into [b, T]."""
    out = np.full((len(prompts), max(len(p) for p in prompts)), pad_id, np.int64)
    for r, p in enumerate(prompts):
        out[r, : len(p)] = p
    return out


def prefill(params: Params, cfg: ModelConfig, prompts, cache, rt: Runtime):
    """One padded forward over ragged prompts -> (logits [b,v] at each row's last token, cache,
    state after the prompts)."""
    lengths = np.array([len(p) for p in prompts])
    state = positions.start_state(cfg, prompts)
    tokens = pad(prompts)  # [b,T]
    logits, cache = forward(params, cfg, tokens, cache, state, rt)  # [b,T,v]
    last = logits[np.arange(len(prompts)), lengths - 1]  # [b,T,v] -> [b,v]
    return last, cache, positions.advance(state, lengths)


def decode(params: Params, cfg: ModelConfig, ids, cache, state, rt: Runtime):
    """One token per row [b] at slot state.lengths -> (logits [b,v], cache, state after it)."""
    logits, cache = forward(params, cfg, ids[:, None], cache, state, rt)  # [b,1,v]
    return logits[:, 0], cache, positions.advance(state, 1)


def record(
    rows: list[Generation], done, ids, logits, stopping: Stopping, on_token, logprobs=None
) -> None:
    """Append each running row's chosen id (and, given `logits` [b,v], the logits that chose
    it; given `logprobs`, token_logprobs' host arrays ([b], [b,n], [b,n]), its TokenLogprob),
    tell `on_token`, and mark the rows that stop (`done` in place). Both backends' loops."""
    tokens = per_row(*logprobs) if logprobs is not None else None
    for r in np.flatnonzero(~done):
        token = int(ids[r])
        rows[r].ids.append(token)
        if logits is not None:
            rows[r].logits.append(np.array(logits[r]))
        if tokens is not None:
            rows[r].logprobs.append(tokens[r])
        if on_token:
            on_token(int(r), token)
        reason = stopping.reason(rows[r].ids)
        if reason:
            rows[r].finish_reason, done[r] = reason, True


def stream(
    params,
    cfg,
    logits,
    cache,
    state,
    seen,
    seeds,
    stopping,
    sampling,
    rt,
    on_token,
    return_logits,
    logprobs=None,
):
    """The token loop: sample each row's next id, record it (with its logprobs from the raw
    logits, given n), stop rows, decode the next step."""
    b = logits.shape[0]
    rows = [Generation([], "length") for _ in range(b)]
    done = np.zeros(b, bool)
    steps = 0
    for step in range(stopping.max_new_tokens):
        ids = sample(logits, sampling, seen, seeds, step)  # [b,v] -> [b]
        seen[np.arange(b), ids] = True  # a stopped row's later ids are never read
        lp = None if logprobs is None else token_logprobs(logits, ids, logprobs)
        record(rows, done, ids, logits if return_logits else None, stopping, on_token, lp)
        if done.all():
            break
        logits, cache, state = decode(params, cfg, ids, cache, state, rt)
        steps += 1
    return rows, steps


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    stopping: Stopping,
    sampling: SamplingConfig = SamplingConfig(),
    seeds: int | Sequence[int] = 0,
    on_token: Callable[[int, int], None] | None = None,
    rt: Runtime = Runtime(backend="numpy"),
    return_logits: bool = False,
    logprobs: int | None = None,
) -> GenerateResult:
    """Generate for each prompt; `on_token(row, id)` is called as each id is chosen; given
    `logprobs` (n in [0, MAX_LOGPROBS]), each row's `Generation.logprobs` holds a TokenLogprob
    per id: its log-probability under the raw logits and the n most likely ids."""
    prompts, seeds, length = check_request(cfg, prompts, stopping, seeds, rt.cache_len)
    logprobs = check_logprobs(logprobs, cfg.vocab)
    b = len(prompts)
    seen = np.zeros((b, cfg.vocab), bool)
    for r, p in enumerate(prompts):
        seen[r, p] = True

    t0 = time.perf_counter()
    cache = kv_cache.init_cache(cfg, b, length, rt.kv_dtype)
    logits, cache, state = prefill(params, cfg, prompts, cache, rt)
    t1 = time.perf_counter()
    rows, steps = stream(
        params,
        cfg,
        logits,
        cache,
        state,
        seen,
        seeds,
        stopping,
        sampling,
        rt,
        on_token,
        return_logits,
        logprobs,
    )
    return GenerateResult(rows, t1 - t0, time.perf_counter() - t1, steps)
