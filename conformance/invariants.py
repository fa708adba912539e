"""Invariants every backend must keep, as reusable checks (STYLE.md rule 13).

A `NumpyRunner` or `JaxRunner` binds a model to a backend behind one call, `forward(tokens,
cache, state, runtime)` with host-side states; `teacher_forced` runs ragged rows through either
(one padded chunk, then single decode steps), and `prefill_logits` reads the logits at every
prompt position from the JAX engine's own prefill program. Each check below runs on either:
- `prefill_equals_steps`: logits of a sequence prefilled in one chunk equal those of single
  decode steps, for every cache dtype and attention kind (attention reads K/V back from the
  cache after writing, PAPER.md section 3);
- `backends_agree`: the same prompts and teacher-forced tokens give the same logits in two
  runners, within `tolerances.ACROSS_BACKENDS` of the cache dtype;
- `kinds_agree`: slim == flash == naive attention;
- `int8_within_bound`: int8 storage is within half a quantisation step of the stored values;
- `rows_equal_alone`: a ragged batch row generates what the row generates alone;
- `same_generations`: seeded sampling (or greedy) gives identical ids in two backends, except
  where a decision sits within `tolerances.DECISION` of its threshold (`margins`): such
  boundary flips are legitimate, and returned as notes to report.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from slimllm.jaxbackend.engine import bucket, program_runtime
from slimllm.jaxbackend.generate import cache_length, prefill_fn
from slimllm.jaxbackend.positions import device_state
from slimllm.jaxbackend.sequence import chunk_fn
from slimllm.reference import kv_cache as ref_kv
from slimllm.reference import positions
from slimllm.reference import sampling as ref_sampling
from slimllm.reference.config import DynamicNTK, ModelConfig
from slimllm.reference.model import forward as ref_forward
from slimllm.reference.ops import softmax
from slimllm.reference.params import Params
from slimllm.reference.runtime import Runtime

from .tolerances import ACROSS_BACKENDS, DECISION, FUNCTION, THROUGH_CACHE, assert_close

# ---------------------------------------------------------------- one model, either backend


@dataclass
class NumpyRunner:
    """The reference: `reference.model.forward` on NumPy caches."""

    params: Params
    cfg: ModelConfig
    backend = "numpy"

    def init_cache(self, batch: int, length: int, kv_dtype: str):
        return ref_kv.init_cache(self.cfg, batch, length, kv_dtype)

    def forward(self, tokens, cache, state: positions.SeqState, runtime: Runtime):
        """tokens [b,t] after state.lengths -> (logits [b,t,v], cache)."""
        return ref_forward(self.params, self.cfg, tokens, cache, state, runtime)


@dataclass
class JaxRunner:
    """The JAX backend through an `Engine`: its compiled `chunk_fn` programs, cached per shape
    and runtime by `Engine.run`, with the cache donated as in generation."""

    engine: object  # slimllm.jaxbackend.engine.Engine
    backend = "jax"

    @property
    def cfg(self) -> ModelConfig:
        return self.engine.cfg

    def init_cache(self, batch: int, length: int, kv_dtype: str):
        return self.engine.new_cache(batch, length, kv_dtype)

    def forward(self, tokens, cache, state: positions.SeqState, runtime: Runtime):
        static = {"cfg": self.cfg, "rt": runtime}
        tokens = jnp.asarray(tokens, jnp.int32)
        logits, cache = self.engine.run(
            chunk_fn, static, (2,), self.engine.params, tokens, cache, device_state(state)
        )
        return np.asarray(logits), cache


def teacher_forced(runner, rows, first, runtime: Runtime, pad_to: int = 0, state=None):
    """Logits [len(row), v] of every row: its first `first[r]` tokens as one chunk (right-padded
    to `pad_to`, as generation pads prompts to a bucket), then one decode step per remaining
    token. `state` defaults to the one read off those first tokens (the prompt)."""
    b = len(rows)
    first = [int(f) for f in np.broadcast_to(first, (b,))]
    steps = max(len(row) - f for row, f in zip(rows, first, strict=True))
    width = max(pad_to, *first)
    if state is None:
        state = positions.start_state(runner.cfg, [row[:f] for row, f in zip(rows, first)])
    cache = runner.init_cache(b, max(width, max(first) + steps), runtime.kv_dtype)
    chunk = np.zeros((b, width), np.int64)  # padding sits in every real query's future
    for r, (row, f) in enumerate(zip(rows, first)):
        chunk[r, :f] = row[:f]
    logits, cache = runner.forward(chunk, cache, state, runtime)
    out = [[logits[r, :f]] for r, f in enumerate(first)]
    state = positions.advance(state, np.array(first))
    for i in range(steps):
        live = [f + i < len(row) for row, f in zip(rows, first)]
        tokens = np.array([[row[f + i] if ok else 0] for row, f, ok in zip(rows, first, live)])
        logits, cache = runner.forward(tokens, cache, state, runtime)
        for r in np.flatnonzero(live):
            out[r].append(logits[r])
        state = positions.advance(state, 1)
    return [np.concatenate(o) for o in out]


def prefill_logits(
    engine,
    prompts,
    max_new_tokens: int,
    rt: Runtime = Runtime(),
):
    """Logits [len(p), v] at every position of each prompt from the program `generate` prefills
    with (prompts padded to a bucket, one chunk, nothing cached before): each call selects one
    position per row, so nothing new is compiled. The cache is sized as `generate` sizes it for
    `max_new_tokens` and `rt.cache_len`, so the program is the one generation uses."""
    longest = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), bucket(longest)), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)] = p
    state = device_state(positions.start_state(engine.cfg, prompts))
    static = {"cfg": engine.cfg, "rt": program_runtime(rt)}
    length = cache_length(prompts, max_new_tokens, rt, engine.cfg.max_len)
    out = [[] for _ in prompts]
    for i in range(longest):
        select = jnp.asarray([min(i, len(p) - 1) for p in prompts], jnp.int32)
        cache = engine.new_cache(len(prompts), length, rt.kv_dtype)  # donated
        logits, _ = engine.run(
            prefill_fn, static, (2,), engine.params, jnp.asarray(tokens), cache, state, select
        )
        for r in (r for r, p in enumerate(prompts) if i < len(p)):
            out[r].append(np.asarray(logits[r]))
    return [np.stack(rows) for rows in out]


# ---------------------------------------------------------------- model invariants


def prefill_equals_steps(runner, rows, runtime: Runtime, pad_to: int = 0) -> None:
    """One chunk over whole rows == single steps, within THROUGH_CACHE of the cache dtype.
    A prefix-LM prefix attends both ways, so it is prefilled as one chunk; dynamic-NTK configs
    are excluded by design (their alpha is chosen by the prompt's length)."""
    cfg = runner.cfg
    if isinstance(cfg.rope_scaling, DynamicNTK):
        raise ValueError("dynamic NTK: prefill and single steps differ by design")
    state = positions.start_state(cfg, rows)
    first = state.prefix + 1 if cfg.prefix_lm else 1
    full = teacher_forced(runner, rows, [len(r) for r in rows], runtime, pad_to, state)
    steps = teacher_forced(runner, rows, first, runtime, pad_to, state)
    for r, (a, b) in enumerate(zip(steps, full, strict=True)):
        assert_close(
            a,
            b,
            THROUGH_CACHE[runtime.kv_dtype],
            f"{runner.backend} {runtime} row {r}: steps vs prefill",
        )


def backends_agree(
    want_runner, got_runner, prompts, continuations, runtime: Runtime, pad_to: int = 0
) -> None:
    """Prefill ragged prompts, then decode teacher-forced continuations: every logit of
    `got_runner` within ACROSS_BACKENDS of `want_runner`'s (the same runtime on both)."""
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    first = [len(p) for p in prompts]
    want = teacher_forced(want_runner, rows, first, runtime, pad_to)
    got = teacher_forced(got_runner, rows, first, runtime, pad_to)
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(
            g,
            w,
            ACROSS_BACKENDS[runtime.kv_dtype],
            f"{got_runner.backend} vs {want_runner.backend} {runtime} row {r}",
        )


# ---------------------------------------------------------------- attention and storage


def kinds_agree(outputs: dict, rtol: float = FUNCTION["float32"]) -> None:
    """Every attention output in `outputs` (name -> [b,t,h,d]) equals outputs["naive"]."""
    want = np.asarray(outputs["naive"])
    for name, got in outputs.items():
        assert_close(np.asarray(got), want, rtol, f"{name} vs naive")


def int8_within_bound(q, scale, x) -> None:
    """int8 storage of x [..., d]: q in [-127, 127] and |q * scale - x| <= scale / 2 (round to
    nearest), up to the float32 rounding of scale and of the product."""
    q, scale, x = np.asarray(q), np.asarray(scale), np.asarray(x, np.float32)
    assert q.dtype == np.int8 and q.min(initial=0) >= -127, "int8 values outside [-127, 127]"
    err = np.abs(q.astype(np.float32) * scale[..., None] - x)
    bound = scale[..., None] / 2 * (1 + FUNCTION["float32"]) + FUNCTION["float32"] * np.abs(x)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"int8 error {err[worst]:.3g} > {bound[worst]:.3g} at {worst}"


# ---------------------------------------------------------------- generation


def rows_of(result) -> list[tuple[list[int], str]]:
    """(ids, finish reason) per row of a GenerateResult or a `slimllm.Output`."""
    if hasattr(result, "rows"):
        return [(row.ids, row.finish_reason) for row in result.rows]
    return list(zip(result.ids, result.finish_reasons, strict=True))


def step_logits(result, row: int, step: int) -> np.ndarray:
    """Raw logits [v] that chose id `step` of `row` (a result generated with return_logits)."""
    if hasattr(result, "rows"):
        return np.asarray(result.rows[row].logits[step])
    return np.asarray(result.logits[row][step])


def rows_equal_alone(run, prompts, seeds) -> None:
    """`run(prompts, seeds)` on a ragged batch gives every row what it gives that row alone."""
    batch = rows_of(run(prompts, seeds))
    for r, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        alone = rows_of(run([p], [s]))[0]
        assert batch[r] == alone, f"row {r}: batch {batch[r]} vs alone {alone}"


def margins(logits, sampling, seen, u=None) -> np.ndarray:
    """Per row [b], the smallest relative change of raw logits [b,v] (in units of max |logit|)
    that could flip a decision of `reference.sampling.sample`: greedy argmax; the top-k, top-p
    and min-p cuts; the inverse-CDF draw by `u` [b] (skipped when None). Each distance to a
    threshold is divided by how far such a change can move it (a logit gap closes by 2x, a
    probability by 2x, a log probability ratio by 4x; penalty and temperature scale logits)."""
    x = ref_sampling.repetition_penalty(
        logits.astype(np.float32), seen, sampling.repetition_penalty
    )
    p = sampling.repetition_penalty
    unit = np.where(np.isfinite(logits), np.abs(logits), 0).max(axis=-1) * max(p, 1 / p)  # [b]
    if sampling.greedy:
        top = np.sort(x, axis=-1)[:, -2:]
        return (top[:, 1] - top[:, 0]) / (2 * unit)
    unit = unit / sampling.temperature
    x = x / np.float32(sampling.temperature)
    found = [np.full(x.shape[0], np.inf)]
    if 0 < sampling.top_k < x.shape[-1]:
        desc = -np.sort(-x, axis=-1)
        found.append((desc[:, sampling.top_k - 1] - desc[:, sampling.top_k]) / (2 * unit))
        x = ref_sampling.top_k_filter(x, sampling.top_k)
    if sampling.top_p < 1.0:
        probs = softmax(np.sort(x, axis=-1))
        gap = np.abs(np.cumsum(probs, axis=-1) - np.float32(1.0 - sampling.top_p))
        found.append(np.where(probs > 0, gap, np.inf)[:, :-1].min(axis=-1) / (2 * unit))
        x = ref_sampling.top_p_filter(x, sampling.top_p)
    if sampling.min_p > 0.0:
        probs = softmax(x)
        with np.errstate(divide="ignore"):
            gap = np.abs(np.log(probs) - np.log(sampling.min_p * probs.max(-1, keepdims=True)))
        found.append(np.where(probs > 0, gap, np.inf).min(axis=-1) / (4 * unit))
        x = ref_sampling.min_p_filter(x, sampling.min_p)
    if u is not None:
        probs = softmax(x)
        cum = np.cumsum(probs, axis=-1)
        gap = np.abs(cum - u[:, None] * cum[:, -1:]) / cum[:, -1:]
        found.append(np.where(probs > 0, gap, np.inf).min(axis=-1) / (2 * unit))
    return np.min(found, axis=0)


def same_generations(want, got, prompts, sampling, seeds, bound: float = DECISION) -> list[str]:
    """`got` repeats `want` (a result generated with return_logits=True) id for id and reason
    for reason. A row may diverge only at a step whose decision margin in `want`'s
    logits is below `bound`; such boundary flips are returned as notes, anything else fails."""
    notes = []
    seeds = np.broadcast_to(np.asarray(seeds, np.int64), (len(prompts),))
    for r, ((w_ids, w_reason), (g_ids, g_reason)) in enumerate(
        zip(rows_of(want), rows_of(got), strict=True)
    ):
        if w_ids == g_ids:
            assert w_reason == g_reason, f"row {r}: finish {g_reason!r}, want {w_reason!r}"
            continue
        n = next((i for i, (a, b) in enumerate(zip(w_ids, g_ids)) if a != b), None)
        assert n is not None, f"row {r}: same ids but stopped at {len(g_ids)}, want {len(w_ids)}"
        logits = step_logits(want, r, n)[None]
        seen = np.zeros_like(logits, bool)
        seen[0, list(prompts[r]) + w_ids[:n]] = True
        u = ref_sampling.uniform(seeds[r : r + 1], n)
        margin = float(margins(logits, sampling, seen, u)[0])
        what = f"row {r} step {n}: id {g_ids[n]}, want {w_ids[n]} (decision margin {margin:.2e})"
        assert margin < bound, f"{what} is not at a decision boundary ({bound:.0e})"
        notes.append(f"boundary flip, {what}")
    return notes
