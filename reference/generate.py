"""Generation: prefill a batch of prompts, then one decode step per token, in a plain loop.

Prompts of different lengths share one padded prefill: row r writes its L_r real tokens to cache
slots 0..L_r-1 (pad tokens after them are written too but are never visible to a real query,
being in its future) and reads its first logits at L_r - 1. Each decode step writes row r's new
token at slot `lengths[r]`, overwriting padding, so every row computes exactly what it would
alone. Stopping: max new tokens, EOS ids, stop token sequences, stop strings (HF semantics: the
stop token is part of the output). The JAX backend's `generate` has the same contract.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import kv_cache, positions
from .config import ModelConfig
from .model import forward
from .params import Params
from .runtime import Runtime
from .sampling import SamplingConfig, sample


@dataclass
class Generation:
    ids: list[int]  # generated ids only
    finish_reason: str  # "length" | "eos" | "stop"
    logits: list = field(default_factory=list)  # raw logits [v] that produced each id, if asked


@dataclass
class GenerateResult:
    rows: list[Generation]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    compile_seconds: float = 0.0  # JAX backend: compilation, kept out of the timings above


@dataclass
class Stopping:
    max_new_tokens: int = 64
    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None  # needed for stop strings

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_strings and self.decode is None:
            raise ValueError("stop strings need a tokenizer to decode the output")

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


def check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int, cache_len: int | None) -> int:
    """Validate prompts and return the cache length to allocate."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    for p in prompts:
        bad = [token for token in p if not 0 <= int(token) < cfg.vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab})")
    need = longest + max_new_tokens
    if longest > cfg.max_len:
        raise ValueError(
            f"prompt of {longest} tokens is longer than the model's context {cfg.max_len}"
        )
    if need > cfg.max_len:
        raise ValueError(
            f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {need} exceeds the model's "
            f"context {cfg.max_len}"
        )
    if cache_len is not None and need > cache_len:
        raise ValueError(
            f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {need} "
            f"is longer than the cache ({cache_len})"
        )
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


def record(rows: list[Generation], done, ids, logits, stopping: Stopping, on_token) -> None:
    """Append each running row's chosen id (and, given `logits` [b,v], the logits that chose
    it), tell `on_token`, and mark the rows that stop (`done` in place). Both backends' loops."""
    for r in np.flatnonzero(~done):
        token = int(ids[r])
        rows[r].ids.append(token)
        if logits is not None:
            rows[r].logits.append(np.array(logits[r]))
        if on_token:
            on_token(int(r), token)
        reason = stopping.reason(rows[r].ids)
        if reason:
            rows[r].finish_reason, done[r] = reason, True


def stream(
    params, cfg, logits, cache, state, seen, seeds, stopping, sampling, rt, on_token, return_logits
):
    """The token loop: sample each row's next id, record it, stop rows, decode the next step."""
    b = logits.shape[0]
    rows = [Generation([], "length") for _ in range(b)]
    done = np.zeros(b, bool)
    steps = 0
    for step in range(stopping.max_new_tokens):
        ids = sample(logits, sampling, seen, seeds, step)  # [b,v] -> [b]
        seen[np.arange(b), ids] = True  # a stopped row's later ids are never read
        record(rows, done, ids, logits if return_logits else None, stopping, on_token)
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
) -> GenerateResult:
    """Generate for each prompt; `on_token(row, id)` is called as each id is chosen."""
    prompts = [[int(t) for t in p] for p in prompts]
    b = len(prompts)
    length = check_prompts(cfg, prompts, stopping.max_new_tokens, rt.cache_len)
    seeds = np.broadcast_to(np.asarray(seeds, np.int64), (b,)).copy()
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
    )
    return GenerateResult(rows, t1 - t0, time.perf_counter() - t1, steps)
