"""Generation in JAX: the reference's `generate.py` (same prompts, stopping rules, seeds and
results), compiled, on an `Engine` (engine.py: device weights, placement, compiled programs).

Two forms:
- `loop` (batch use): prefill, then the whole token loop in one XLA program (`lax.while_loop`:
  sample, record, check EOS / stop sequences / length, decode the next token unless finished).
- `stream`: the host sees every id as it is chosen (callbacks, stop strings, streamed text).
  On one process where the kernels run, without logits or logprobs, the loop program itself
  hands each step's ids to the host through a token channel (`channel_stream`,
  kernels/channel.py) and stops the rows the host stops, a step or more after it did. Otherwise
  prefill, then one compiled program per token (`step_fn`: decode the ids just chosen, then
  choose the next ones). The next step is dispatched before the host reads the current ids, so
  the device never waits for the host's bookkeeping; a row set that stops early leaves one step
  computed for nothing. Dispatching a program a token took ~0.6 ms of the host's CPU a token,
  beside the device's two cores: the channel made the 156M model's streamed tokens 4-16%
  faster (bench/README.md). With `logprobs=n` the per-token program computes each token's
  logprob and top-n on the device, and only those [b, 2n+1] numbers reach the host, never the
  [b, v] logits.

jit discipline: the cache is preallocated to a static length and donated to every program;
prompts are right-padded to a bucket (16, 32, 64, ... tokens), the cache length is bucketed too
(`cache_length`), the loop's output buffer is a power of two, while max_new_tokens and
the sampling values (`sampling.Sampling`) are traced: a new prompt length, token budget,
temperature or top-p rarely compiles anything. Under tensor parallelism sampling reads
vocabulary slices (`tp.sample_ranked`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.kernels import channel as token_channel
from slimllm.reference import positions as ref_positions
from slimllm.reference.generate import (
    GenerateResult,
    Generation,
    Stopping,
    check_mode,
    check_request,
    pad,
    record,
)
from slimllm.reference.sampling import SamplingConfig

from . import positions
from .engine import Engine, bucket, program_runtime
from .logprobs import check_logprobs, token_logprobs
from .model import forward
from .runtime import Runtime
from .sampling import Sampling, seed_words
from .tp import SINGLE, sample_ranked

REASONS = {1: "length", 2: "eos", 3: "stop"}


# ---------------------------------------------------------------- programs (pure functions)


# Logits and seen-token masks are [b, v] on one rank and this rank's vocabulary slice
# [b, v/R] under tensor parallelism; ids, positions and seeds are replicated on every rank.


def prefill_fn(params, tokens, cache, state, select, *, cfg, rt, comm=SINGLE):
    """Prompt tokens [b,T] -> logits [b,v] at each row's last real token, filled cache."""
    logits, cache = forward(params, cfg, tokens, cache, state, rt, select=select, comm=comm)
    return logits[:, 0], cache


def decode_fn(params, ids, cache, state, *, cfg, rt, comm=SINGLE):
    """One token per row [b] at slot state.lengths -> logits [b,v], cache."""
    logits, cache = forward(params, cfg, ids[:, None], cache, state, rt, comm=comm)
    return logits[:, 0], cache


def sample_fn(logits, seen, seeds, step, sampling, *, comm=SINGLE):
    """Choose ids [b] and mark them as seen (for the repetition penalty)."""
    return sample_ranked(logits, sampling, seen, seeds, step, comm)


def logprobs_fn(logits, ids, *, n, comm=SINGLE):
    """The chosen ids' logprobs [b], the top-n ids and logprobs [b,n] (logprobs.py)."""
    return token_logprobs(logits, ids, n, comm)


def choose_fn(logits, seen, seeds, step, sampling, *, n, comm=SINGLE):
    """sample_fn, then with n (not None) logprobs_fn -> (ids, seen, logprobs or ())."""
    ids, seen = sample_fn(logits, seen, seeds, step, sampling, comm=comm)
    return ids, seen, (() if n is None else logprobs_fn(logits, ids, n=n, comm=comm))


def step_fn(params, ids, cache, state, seen, seeds, step, sampling, *, cfg, rt, n, comm=SINGLE):
    """One streamed token in one program: decode the ids [b] chosen last, then choose the next
    ones (choose_fn) -> (ids, seen, logits [b,v], logprobs or (), cache, state after the ids).
    It replaced three programs per token (decode, sample, the state's advance): 156M model,
    int8 weights, kernels "fast", 5.76 -> 5.08 ms per streamed token (bench/README.md)."""
    logits, cache = decode_fn(params, ids, cache, state, cfg=cfg, rt=rt, comm=comm)
    ids, seen, lp = choose_fn(logits, seen, seeds, step, sampling, n=n, comm=comm)
    return ids, seen, logits, lp, cache, positions.advance(state, 1)


def stop_match(out, n, stops, stop_lens):
    """Does the tail of out[:, :n+1] equal any stop sequence? stops [m, L] padded, lens [m]."""
    L = stops.shape[1]
    idx = n - L + 1 + jnp.arange(L)  # the last L positions, oldest first
    tail = jnp.take(out, jnp.clip(idx, 0, out.shape[1] - 1), axis=1)  # [b, L]
    # right-align each stop sequence against the tail
    shift = L - stop_lens[:, None] + jnp.arange(L)[None, :]  # [m, L]: tail index of stop[j, i]
    want = jnp.where(jnp.arange(L)[None, :] < stop_lens[:, None], stops, -1)
    got = jnp.take(tail, jnp.clip(shift, 0, L - 1), axis=1)  # [b, m, L]
    ok = (got == want[None]) | (jnp.arange(L)[None, None, :] >= stop_lens[None, :, None])
    long_enough = (n + 1 >= stop_lens)[None, :] & (stop_lens > 0)[None, :]
    return jnp.any(jnp.all(ok, axis=-1) & long_enough, axis=-1)


def loop_fn(
    params,
    logits,
    cache,
    state,
    seen,
    seeds,
    eos,
    stops,
    stop_lens,
    sampling,
    max_new,
    channel=None,
    *,
    cfg,
    rt,
    width,
    comm=SINGLE,
):
    """The whole decode loop in one program: -> ids [b, width] (-1 after a row stops or past
    max_new, a traced count <= width), steps, reason [b] (1 length, 2 eos, 3 stop, 4 the host).
    The first token is chosen before the loop, so each iteration decodes then chooses, and the
    loop ends before a decode nobody needs (without a `lax.cond` around the decode: XLA copied
    the whole cache in and out of it). Given a token `channel` (channel_loop_fn), each step's
    ids go to the host as they are chosen and the rows it asks to stop stop."""
    b = logits.shape[0]

    def choose(n, logits, seen, out, done, reason):
        ids, seen = sample_fn(logits, seen, seeds, n, sampling, comm=comm)
        out = out.at[:, n].set(jnp.where(done, -1, ids))
        new = jnp.where(jnp.isin(ids, eos), 2, 0)
        if channel is not None:  # the host's stops arrive a step or more after it decided
            new = jnp.where(token_channel.emit(channel, ids) > 0, 4, new)
        new = jnp.where((new == 0) & stop_match(out, n, stops, stop_lens), 3, new)
        new = jnp.where((new == 0) & (n + 1 >= max_new), 1, new)
        reason = jnp.where(done, reason, new)
        return ids, seen, out, done | (new > 0), reason

    def body(carry):
        n, ids, cache, state, seen, out, done, reason = carry
        logits, cache = decode_fn(params, ids, cache, state, cfg=cfg, rt=rt, comm=comm)
        state = positions.advance(state, 1)
        ids, seen, out, done, reason = choose(n, logits, seen, out, done, reason)
        return n + 1, ids, cache, state, seen, out, done, reason

    out = jnp.full((b, width), -1, jnp.int32)
    first = choose(0, logits, seen, out, jnp.zeros(b, bool), jnp.zeros(b, jnp.int32))
    start = (jnp.int32(1), first[0], cache, state, *first[1:])
    n, _, cache, _, _, out, done, reason = jax.lax.while_loop(
        lambda c: (c[0] < max_new) & ~jnp.all(c[6]), body, start
    )
    return out, reason, n, cache  # the cache is returned so its donated buffers are reused


def channel_loop_fn(*args, **kw):
    """loop_fn streaming its ids through a token channel (`stream` on the kernels)."""
    return loop_fn(*args, **kw)


def prefill(engine: Engine, prompts, cache, rt: Runtime):
    """Bucketed prefill of ragged prompts -> (logits [b,v], cache, state after the prompts)."""
    cfg = engine.cfg
    host_state = ref_positions.start_state(cfg, prompts)
    lengths = np.array([len(p) for p in prompts])
    tokens = pad(prompts)
    tokens = np.pad(tokens, ((0, 0), (0, bucket(tokens.shape[1]) - tokens.shape[1])))
    state = positions.device_state(host_state)
    logits, cache = engine.run(
        prefill_fn,
        {"cfg": cfg, "rt": program_runtime(rt)},
        (2,),
        engine.params,
        jnp.asarray(tokens, jnp.int32),
        cache,
        state,
        jnp.asarray(lengths - 1, jnp.int32),
    )
    return logits, cache, positions.advance(state, jnp.asarray(lengths, jnp.int32))


def decode(engine: Engine, ids, cache, state, rt: Runtime):
    """One token per row [b] at slot state.lengths -> (logits [b,v], cache, state after it)."""
    static = {"cfg": engine.cfg, "rt": program_runtime(rt)}
    logits, cache = engine.run(decode_fn, static, (2,), engine.params, ids, cache, state)
    return logits, cache, positions.advance(state, 1)


MIN_CACHE = 256


def cache_length(prompts, max_new_tokens: int, rt: Runtime, max_len: int) -> int:
    """Slots to allocate: rt.cache_len, else room for the bucketed prompt and every new token,
    rounded up to MIN_CACHE or to a quarter of the power of two below (256, 320, 384, 448,
    512, 640, ...: at most 25% unused), no further than the model's context `max_len`: most
    prompt lengths and token budgets share one cache shape, and so its programs."""
    longest = max(len(p) for p in prompts)
    if rt.cache_len:
        return max(bucket(longest), rt.cache_len)
    need = longest + max_new_tokens
    step = max(MIN_CACHE, 1 << (need - 1).bit_length() - 1) // 4
    rounded = max(MIN_CACHE, -(-need // step) * step)
    return max(bucket(longest), need, min(rounded, max_len))


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    stopping: Stopping,
    sampling: SamplingConfig = SamplingConfig(),
    seeds: int | Sequence[int] = 0,
    on_token: Callable[[int, int], None] | None = None,
    rt: Runtime = Runtime(),
    return_logits: bool = False,
    mode: str | None = None,
    logprobs: int | None = None,
) -> GenerateResult:
    """Generate for each prompt, as the reference's `generate` (mode: "loop" or "stream";
    default: stream when the host must see each token, else loop; logprobs need stream)."""
    cfg = engine.cfg
    prompts, seeds, _ = check_request(cfg, prompts, stopping, seeds, rt.cache_len)
    logprobs = check_logprobs(logprobs, cfg.vocab)
    mode = check_mode(mode, stopping, on_token, return_logits, logprobs)
    b = len(prompts)

    # Programs compile on first use; their compile time is subtracted from the phase it fell in.
    compile0 = engine.compile_seconds
    length = cache_length(prompts, stopping.max_new_tokens, rt, cfg.max_len)
    cache = engine.new_cache(b, length, rt.kv_dtype)
    t0 = time.perf_counter()
    logits, cache, state = prefill(engine, prompts, cache, rt)
    # What only the token loop reads is made while the device runs the prefill, and the loop's
    # first program is queued behind it before the host waits (`prefill_done`): the first token
    # does not wait for the host's bookkeeping.
    seeds = jnp.asarray(seed_words(seeds))
    seen = np.zeros((b, cfg.vocab), bool)
    for r, p in enumerate(prompts):
        seen[r, p] = True
    seen = jnp.asarray(engine.vocab_slice(seen))
    sampling = Sampling.of(sampling, engine.plan.tp)
    marks = []

    def prefill_done():
        """Wait for the prefill's logits (its clock stops here); the runner calls this once its
        first program is dispatched, before it waits for anything itself."""
        if not marks:
            logits.block_until_ready()
            marks.append((time.perf_counter(), engine.compile_seconds))

    run = stream if mode == "stream" else loop
    rows, steps = run(
        engine,
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
        prefill_done,
    )
    (t1, compile1), t2, compile2 = marks[0], time.perf_counter(), engine.compile_seconds
    return GenerateResult(
        rows,
        t1 - t0 - (compile1 - compile0),
        t2 - t1 - (compile2 - compile1),
        steps,
        compile2 - compile0,
    )


def loop_args(engine, logits, cache, state, seen, seeds, stopping, sampling, rt):
    """loop_fn's static settings and arguments for this request."""
    eos = jnp.asarray(list(stopping.eos_ids) or [-1], jnp.int32)
    seqs = stopping.stop_sequences or ((),)
    width = max(1, max(len(s) for s in seqs))
    stops = jnp.asarray([list(s) + [-1] * (width - len(s)) for s in seqs], jnp.int32)
    stop_lens = jnp.asarray([len(s) for s in seqs], jnp.int32)
    static = {
        "cfg": engine.cfg,
        "rt": program_runtime(rt),
        "width": bucket(stopping.max_new_tokens),
    }
    max_new = jnp.int32(stopping.max_new_tokens)
    args = (engine.params, logits, cache, state, seen, seeds, eos, stops, stop_lens, sampling)
    return static, (*args, max_new)


def loop(
    engine,
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
    prefill_done,
):
    """The whole token loop as one program (`loop_fn`); the host needs none of its tokens
    (check_mode: no callbacks, stop strings, logits or logprobs)."""
    static, args = loop_args(engine, logits, cache, state, seen, seeds, stopping, sampling, rt)
    out, reason, n, _ = engine.run(loop_fn, static, (2,), *args)
    prefill_done()
    out, reason = np.asarray(out), np.asarray(reason)
    rows = []
    for r in range(out.shape[0]):
        ids = [int(t) for t in out[r] if t >= 0]
        rows.append(Generation(ids, REASONS.get(int(reason[r]), "length")))
    return rows, max(int(n) - 1, 0)


WAIT = 0.05  # seconds between checks that a channel's loop program is still running


def channel_stream(
    engine,
    logits,
    cache,
    state,
    seen,
    seeds,
    stopping,
    sampling,
    rt,
    on_token,
    prefill_done,
    channel,
):
    """The whole token loop as one program (`channel_loop_fn`) that hands each step's ids to the
    host through a token channel as they are chosen; the host records them (callbacks, stop
    strings) and sends back the rows it stopped, which the loop stops a step or more later
    (steps computed for nothing, as `stream`'s one). No program is dispatched per token."""
    b = logits.shape[0]
    rows = [Generation([], "length") for _ in range(b)]
    done = np.zeros(b, bool)
    static, args = loop_args(engine, logits, cache, state, seen, seeds, stopping, sampling, rt)
    with channel:
        *_, n, _ = engine.run(channel_loop_fn, static, (2,), *args, channel.operand())
        prefill_done()
        recorded = 0
        while not done.all():
            ids = channel.next(WAIT)
            if ids is None:
                if not n.is_ready():
                    continue
                int(n)  # the program ended: raises its error if it failed
                ids = channel.next(0)  # a step queued as it ended
                if ids is None:
                    raise RuntimeError(
                        f"the decode loop ended after {recorded} steps with rows still running"
                    )
            running = ~done
            record(rows, done, ids, None, stopping, on_token)
            recorded += 1
            for r in np.flatnonzero(running & done):
                channel.stop(int(r))
        int(n)  # return with nothing left running: the loop ends at its next step at the latest
    return rows, max(recorded - 1, 0)


def stream(
    engine,
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
    prefill_done,
):
    """One compiled program per token (`step_fn`), the host recording each id. Step k+1 is
    dispatched before the host waits for step k's ids: it runs while the host records them.
    Without logits or logprobs on one process, where the kernels run, `channel_stream` instead."""
    b = logits.shape[0]
    if not return_logits and logprobs is None and engine.plan.tp == 1 and rt.kernels != "xla":
        channel = token_channel.TokenChannel.open(b)
        if channel is not None:
            args = (logits, cache, state, seen, seeds, stopping, sampling, rt, on_token)
            return channel_stream(engine, *args, prefill_done, channel)
    rows = [Generation([], "length") for _ in range(b)]
    done = np.zeros(b, bool)
    static = {"cfg": engine.cfg, "rt": program_runtime(rt), "n": logprobs}
    ids, seen, lp = engine.run(
        choose_fn, {"n": logprobs}, (), logits, seen, seeds, np.int32(0), sampling
    )
    steps = 0
    for step in range(stopping.max_new_tokens):
        chosen, chosen_logits, chosen_lp = ids, logits, lp
        if step + 1 < stopping.max_new_tokens:  # queue the next step behind this one
            args = (engine.params, ids, cache, state, seen, seeds, np.int32(step + 1), sampling)
            ids, seen, logits, lp, cache, state = engine.run(step_fn, static, (2,), *args)
        prefill_done()  # a no-op after the first token
        host_logits = engine.full_logits(chosen_logits) if return_logits else None
        host_lp = tuple(np.asarray(a) for a in chosen_lp) if logprobs is not None else None
        record(rows, done, np.asarray(chosen), host_logits, stopping, on_token, host_lp)
        if done.all():
            break
        steps += 1  # the last token (length) always ends the loop before this
    return rows, steps
