"""Generation in JAX: the reference's contract (same prompts, stopping rules, seeds and results),
compiled.

Two forms:
- `loop` (batch use): prefill, then the whole token loop in one XLA program (`lax.while_loop`:
  sample, record, check EOS / stop sequences / length, decode the next token unless finished).
- `stream`: prefill, then one compiled decode step and one compiled sampling step per token; the
  host sees every id as it is chosen (callbacks, stop strings, streamed text).

jit discipline: the cache is preallocated to a static length and donated to every program;
prompts are right-padded to a bucket (16, 32, 64, ... tokens) and the cache length is rounded up
to whole key blocks, so a new prompt length rarely compiles anything; programs are compiled
ahead of time (`lower().compile()`), cached per shape, and their compile time is reported apart
from run time. `enable_compilation_cache(dir)` turns on JAX's persistent cache across processes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from slimllm.reference import positions as ref_positions
from slimllm.reference.config import ModelConfig
from slimllm.reference.generate import (
    GenerateResult,
    Generation,
    Stopping,
    check_prompts,
    pad,
)
from slimllm.reference.params import Params
from slimllm.reference.sampling import SamplingConfig

from . import kv_cache, positions, sharding, tp
from .model import attention_fn, forward, tracing
from .params import to_device
from .sampling import choose, process, repetition_penalty, sample, seed_words, uniform
from .tp import SINGLE, Comm

MIN_BUCKET = 16
REASONS = {1: "length", 2: "eos", 3: "stop"}


def bucket(n: int) -> int:
    """Prompt lengths are padded to the next power of two (at least 16)."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def enable_compilation_cache(directory: str) -> None:
    """Persist compiled programs across processes (JAX's compilation cache)."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# ---------------------------------------------------------------- programs (pure functions)


# Logits and seen-token masks are [b, v] on one rank and this rank's vocabulary slice
# [b, v/R] under tensor parallelism; ids, positions and seeds are replicated on every rank.


def prefill_fn(params, tokens, cache, state, select, *, cfg, attention, comm=SINGLE):
    """Prompt tokens [b,T] -> logits [b,v] at each row's last real token, filled cache."""
    pos = positions.positions_for(cfg, state, tokens.shape[1])
    logits, cache = forward(params, cfg, tokens, cache, pos, attention, select=select, comm=comm)
    return logits[:, 0], cache


def decode_fn(params, ids, cache, state, *, cfg, attention, comm=SINGLE):
    """One token per row [b] at slot state.lengths -> logits [b,v], cache."""
    pos = positions.positions_for(cfg, state, 1)
    logits, cache = forward(params, cfg, ids[:, None], cache, pos, attention, comm=comm)
    return logits[:, 0], cache


def chunk_fn(params, tokens, cache, state, *, cfg, attention, comm=SINGLE):
    """Tokens [b,t] after state.lengths -> logits at every position [b,t,v], cache."""
    pos = positions.positions_for(cfg, state, tokens.shape[1])
    return forward(params, cfg, tokens, cache, pos, attention, comm=comm)


def trace_fn(params, tokens, cache, state, *, cfg, attention, comm=SINGLE):
    """chunk_fn returning the named intermediates (model.TRACE_KEYS) instead of the logits: a
    separate program, traced inside `tracing()`, so the untraced ones are unchanged."""
    pos = positions.positions_for(cfg, state, tokens.shape[1])
    with tracing() as trace:
        _, cache = forward(params, cfg, tokens, cache, pos, attention, comm=comm)
    return trace, cache


def gather_fn(logits, *, comm=SINGLE):
    """Full logits [b, v] from the ranks' slices (only when the caller asks for them)."""
    return tp.gather_vocab(logits, comm)


def choose_sharded(logits, sampling: SamplingConfig, seen, seeds, step, comm: Comm):
    """The single-rank sampler's choice, from vocabulary slices: greedy by a (value, id)
    reduction, top-k sampling from the gathered local top-k, else from gathered logits."""
    scores = repetition_penalty(logits.astype(jnp.float32), seen, sampling.repetition_penalty)
    if sampling.greedy:
        return tp.greedy(scores, comm)
    u = uniform(seeds, step)

    def from_full(scores):
        full = tp.gather_vocab(scores, comm)
        return choose(process(full, sampling, None, penalty=False), u)

    if sampling.top_k <= 0:
        return from_full(scores)
    k = min(sampling.top_k, scores.shape[-1])
    cand, ids = tp.top_k_candidates(scores, k, comm)

    def from_candidates(scores):
        picked = choose(process(cand, sampling, None, penalty=False), u)
        return jnp.take_along_axis(ids, picked[:, None], -1)[:, 0]

    # Top-k keeps every token tied with the k-th value. The candidates hold the exact global
    # k-th value, but a rank may hold more ties than the k it offered: then (rarely) gather all.
    kth = -jnp.sort(-cand, axis=-1)[:, k - 1]  # [b]
    more_ties = jnp.any(jnp.sum(scores >= kth[:, None], axis=-1) > k)
    return lax.cond(comm.max(more_ties.astype(jnp.int32)) > 0, from_full, from_candidates, scores)


def sample_fn(logits, seen, seeds, step, *, sampling, comm=SINGLE):
    """Choose ids [b] and mark them as seen (for the repetition penalty)."""
    if comm.size == 1:
        ids = sample(logits, sampling, seen, seeds, step)
        return ids, seen.at[jnp.arange(ids.shape[0]), ids].set(True)
    ids = choose_sharded(logits, sampling, seen, seeds, step, comm).astype(jnp.int32)
    local = ids - tp.vocab_offset(comm, seen.shape[-1])
    local = jnp.where((local >= 0) & (local < seen.shape[-1]), local, seen.shape[-1])
    return ids, seen.at[jnp.arange(ids.shape[0]), local].set(True, mode="drop")


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
    *,
    cfg,
    attention,
    sampling,
    max_new,
    comm=SINGLE,
):
    """The whole decode loop in one program: -> ids [b, max_new] (-1 after a row stops),
    count [b], reason [b] (1 length, 2 eos, 3 stop)."""
    b = logits.shape[0]
    out = jnp.full((b, max_new), -1, jnp.int32)

    def body(carry):
        n, logits, cache, state, seen, out, done, reason = carry
        ids, seen = sample_fn(logits, seen, seeds, n, sampling=sampling, comm=comm)
        out = out.at[:, n].set(jnp.where(done, -1, ids))
        new = jnp.where(jnp.isin(ids, eos), 2, 0)
        new = jnp.where((new == 0) & stop_match(out, n, stops, stop_lens), 3, new)
        new = jnp.where((new == 0) & (n + 1 >= max_new), 1, new)
        reason = jnp.where(done, reason, new)
        done = done | (new > 0)

        def step(args):
            cache, state = args
            logits, cache = decode_fn(
                params, ids, cache, state, cfg=cfg, attention=attention, comm=comm
            )
            return logits, cache, positions.advance(state, 1)

        logits, cache, state = jax.lax.cond(
            jnp.all(done), lambda args: (logits, *args), step, (cache, state)
        )
        return n + 1, logits, cache, state, seen, out, done, reason

    start = (
        jnp.int32(0),
        logits,
        cache,
        state,
        seen,
        out,
        jnp.zeros(b, bool),
        jnp.zeros(b, jnp.int32),
    )
    n, _, cache, _, _, out, done, reason = jax.lax.while_loop(
        lambda c: (c[0] < max_new) & ~jnp.all(c[6]), body, start
    )
    return out, reason, n, cache  # the cache is returned so its donated buffers are reused


# ---------------------------------------------------------------- the engine

# How each program's arguments and results are laid out across tensor-parallel ranks.
LAYOUTS = {
    "prefill_fn": (("params", "rep", "cache", "rep", "rep"), ("vocab", "cache")),
    "decode_fn": (("params", "rep", "cache", "rep"), ("vocab", "cache")),
    "chunk_fn": (("params", "rep", "cache", "rep"), ("vocab3", "cache")),
    "trace_fn": (("params", "rep", "cache", "rep"), ("trace", "cache")),
    "gather_fn": (("vocab",), "rep"),
    "sample_fn": (("vocab", "vocab", "rep", "rep"), ("rep", "vocab")),
    "loop_fn": (
        ("params", "vocab", "cache", "rep", "vocab", "rep", "rep", "rep", "rep"),
        ("rep", "rep", "rep", "cache"),
    ),
}


@dataclass
class Compiled:
    program: Callable
    seconds: float


class Engine:
    """One model on the device(s): weights and its compiled programs, reused across calls.

    tp > 1 splits the model over tensor-parallel ranks: `transport="devices"` uses tp XLA
    devices of this process (shard_map), `transport="mpi"` makes this process one of tp MPI
    ranks holding only its slice of the weights.
    """

    def __init__(self, params: Params, cfg: ModelConfig, tp: int = 1, transport: str = "devices"):
        self.mesh = None
        self.kv_copies = 1  # > 1 when tp exceeds the kv heads and each is replicated
        if tp == 1:
            self.comm, self.cfg, self.params = SINGLE, cfg, to_device(params)
        else:
            prepared, self.cfg = sharding.prepare(params, cfg, tp)
            self.kv_copies = self.cfg.n_kv_heads // cfg.n_kv_heads
            if transport == "devices":
                devices = jax.devices()
                if len(devices) < tp:
                    raise ValueError(
                        f"tp={tp} needs {tp} XLA devices but this process has {len(devices)} "
                        f"(set XLA_FLAGS=--xla_force_host_platform_device_count={tp} before "
                        "jax is imported, or run under mpiexec)"
                    )
                self.mesh = jax.sharding.Mesh(np.array(devices[:tp]), (tp_axis(),))
                self.comm, self.params = (
                    Comm("axis", tp),
                    sharding.shard_params(prepared, self.mesh),
                )
            elif transport == "mpi":
                from . import mpi

                if mpi.size() != tp:
                    raise ValueError(f"tp={tp} but the MPI job has {mpi.size()} ranks")
                self.comm = Comm("mpi", tp)
                self.params = to_device(sharding.local_slice(prepared, mpi.rank(), tp))
            else:
                raise ValueError(f"unknown transport {transport!r}: expected devices or mpi")
        self.programs: dict = {}
        self.compile_seconds = 0.0

    # -- layout of arguments over the ranks

    def spec(self, kind, arg):
        P = jax.sharding.PartitionSpec
        return {
            "params": lambda: sharding.spec_tree(self.params),
            "cache": lambda: sharding.cache_specs(arg),
            "vocab": lambda: sharding.VOCAB,
            "vocab3": lambda: P(None, None, tp_axis()),
            "rep": lambda: P(),
            "trace": lambda: {name: self.trace_spec(name) for name in self.trace_names()},
        }[kind]()

    def trace_names(self) -> list[str]:
        from .model import TRACE_KEYS

        names = []
        for key in TRACE_KEYS:
            if key == "final_norm" and not self.cfg.final_norm:
                continue
            names += [key.format(i=i) for i in range(self.cfg.n_layers)] if "{i}" in key else [key]
        return names

    def trace_spec(self, name: str):
        """q/k/v are split by heads across ranks, logits by vocabulary; the rest replicated."""
        P = jax.sharding.PartitionSpec
        if name.rsplit(".", 1)[-1] in ("q", "k", "v"):
            return P(None, None, tp_axis(), None)
        return P(None, None, tp_axis()) if name == "logits" else P()

    def place(self, args, kinds):
        """Put arguments where the compiled program expects them (no-op when already there)."""
        if self.mesh is None:
            return args
        Sharding = jax.sharding.NamedSharding
        out = []
        for arg, kind in zip(args, kinds, strict=True):
            if kind == "params":
                out.append(arg)
                continue
            specs = self.spec(kind, arg)
            out.append(
                jax.tree_util.tree_map(
                    lambda s, a: a if s is None else jax.device_put(a, Sharding(self.mesh, s)),
                    specs,
                    arg,
                    is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec),
                )
            )
        return tuple(out)

    def run(self, fn, static: dict, donate: tuple, *args):
        """Run `fn` compiled ahead of time for these argument shapes (compiled once, cached)."""
        ins, outs = LAYOUTS[fn.__name__]
        args = self.place(args, ins)
        # the engine's weights never change shape: leave them out of the (per-token) key
        keyed = args[1:] if args and args[0] is self.params else args
        leaves, tree = jax.tree_util.tree_flatten(keyed)
        shapes = tuple((a.shape, a.dtype) if hasattr(a, "shape") else type(a) for a in leaves)
        key = (fn.__name__, tuple(sorted(static.items())), tree, shapes)
        if key not in self.programs:
            t0 = time.perf_counter()
            body = functools.partial(fn, **static, comm=self.comm)
            if self.mesh is not None:
                out_specs = outs if isinstance(outs, str) else tuple(outs)
                cache = next((a for a, k in zip(args, ins) if k == "cache"), None)
                resolve = lambda k: self.spec(k, cache)  # noqa: E731
                # check_vma=False: loops carry values that are per-rank by construction (local
                # heads) and replicated results come from collectives; the tests check equality.
                body = jax.shard_map(
                    body,
                    mesh=self.mesh,
                    check_vma=False,
                    in_specs=tuple(self.spec(k, a) for k, a in zip(ins, args)),
                    out_specs=resolve(out_specs)
                    if isinstance(out_specs, str)
                    else tuple(resolve(k) for k in out_specs),
                )
            # Compile ahead of time (to time it), but call through the jitted function: it reuses
            # that executable and, unlike a bare AOT executable, threads the runtime tokens of
            # ordered effects (mpi4jax collectives) from one call to the next.
            program = jax.jit(body, donate_argnums=donate)
            program.lower(*args).compile()
            self.programs[key] = Compiled(program, time.perf_counter() - t0)
            self.compile_seconds += self.programs[key].seconds
        return self.programs[key].program(*args)

    # -- the steps generation is made of

    def new_cache(self, prompts, max_new_tokens, cache_len, kv_dtype):
        longest = max(len(p) for p in prompts)
        need = max(bucket(longest), cache_len or longest + max_new_tokens)
        cache = kv_cache.init_cache(self.cfg_local(), len(prompts), need, kv_dtype)
        return self.place((cache,), ("cache",))[0] if self.mesh is not None else cache

    def cfg_local(self) -> ModelConfig:
        """The config whose kv-head count sizes this process's cache arrays (MPI: one slice)."""
        if self.comm.kind == "mpi":
            return self.cfg.replace(
                n_kv_heads=self.cfg.n_kv_heads // self.comm.size,
                n_heads=self.cfg.n_heads // self.comm.size,
            )
        return self.cfg

    def prefill(self, prompts, cache, attention):
        """Bucketed prefill of ragged prompts -> (logits [b,v], cache, state after the prompts)."""
        cfg = self.cfg
        host_state = ref_positions.start_state(cfg, prompts)
        lengths = np.array([len(p) for p in prompts])
        tokens = pad(prompts)
        tokens = np.pad(tokens, ((0, 0), (0, bucket(tokens.shape[1]) - tokens.shape[1])))
        state = positions.device_state(host_state)
        logits, cache = self.run(
            prefill_fn,
            {"cfg": cfg, "attention": attention},
            (2,),
            self.params,
            jnp.asarray(tokens, jnp.int32),
            cache,
            state,
            jnp.asarray(lengths - 1, jnp.int32),
        )
        return logits, cache, positions.advance(state, jnp.asarray(lengths, jnp.int32))

    def sequence_logits(self, tokens, bounds, kv_dtype: str, attention: str):
        """Teacher-forced logits [n, v] of one sequence, forwarded in chunks ending at `bounds`
        (the first chunk is the prompt)."""
        cfg = self.cfg
        state = positions.device_state(ref_positions.start_state(cfg, [tokens[: bounds[0]]]))
        cache = kv_cache.init_cache(self.cfg_local(), 1, len(tokens), kv_dtype)
        out, start = [], 0
        for end in bounds:
            logits, cache = self.run(
                chunk_fn,
                {"cfg": cfg, "attention": attention},
                (2,),
                self.params,
                jnp.asarray([tokens[start:end]], jnp.int32),
                cache,
                state,
            )
            out.append(self.full_logits(logits[0]))
            state, start = positions.advance(state, end - start), end
        return np.concatenate(out)

    def vocab_slice(self, a: np.ndarray) -> np.ndarray:
        """This process's columns of a host [b, v] array (all of them unless an MPI rank)."""
        if self.comm.kind != "mpi":
            return a
        n = a.shape[-1] // self.comm.size
        return a[..., self.comm.rank() * n : (self.comm.rank() + 1) * n]

    def trace(self, tokens, prompt_len: int, kv_dtype: str, attention: str) -> dict:
        """Named intermediates of one forward over `tokens` (prefix-LM / NTK facts from the
        first `prompt_len` tokens): name -> host array [t, ...]."""
        if self.comm.kind == "mpi":
            raise ValueError("tracing runs in one process: use tp over devices, not mpiexec")
        cfg = self.cfg
        state = positions.device_state(ref_positions.start_state(cfg, [tokens[:prompt_len]]))
        cache = kv_cache.init_cache(cfg, 1, len(tokens), kv_dtype)
        trace, _ = self.run(
            trace_fn,
            {"cfg": cfg, "attention": attention},
            (2,),
            self.params,
            jnp.asarray([tokens], jnp.int32),
            cache,
            state,
        )
        out = {name: np.asarray(value[0]) for name, value in trace.items()}
        for name in out:  # report the model's own kv heads, not their tensor-parallel copies
            if name.rsplit(".", 1)[-1] in ("k", "v"):
                out[name] = out[name][:, :: self.kv_copies]
        return out

    def full_logits(self, logits) -> np.ndarray:
        """Host copy of full logits from per-rank slices ([..., v/R] -> [..., v])."""
        if self.comm.kind != "mpi":
            return np.asarray(logits)  # a sharded global array already has the full shape
        flat = logits.reshape(-1, logits.shape[-1])
        full = self.run(gather_fn, {}, (), flat)
        return np.asarray(full).reshape(*logits.shape[:-1], -1)


def tp_axis() -> str:
    return tp.AXIS


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    stopping: Stopping,
    sampling: SamplingConfig = SamplingConfig(),
    seeds: int | Sequence[int] = 0,
    on_token: Callable[[int, int], None] | None = None,
    cache_len: int | None = None,
    kv_dtype: str = "float32",
    attention: str = "naive",
    return_logits: bool = False,
    mode: str | None = None,
) -> GenerateResult:
    """Generate for each prompt, as the reference's `generate` (mode: "loop" or "stream";
    default: stream when the host must see each token, else loop)."""
    cfg = engine.cfg
    prompts = [[int(t) for t in p] for p in prompts]
    check_prompts(cfg, prompts, stopping.max_new_tokens, cache_len)
    attention_fn(attention)
    if mode is None:
        host_needed = on_token or stopping.stop_strings or return_logits
        mode = "stream" if host_needed else "loop"
    if mode not in ("loop", "stream"):
        raise ValueError(f"unknown generation mode {mode!r}: expected 'loop' or 'stream'")
    if mode == "loop" and (on_token or stopping.stop_strings or return_logits):
        raise ValueError("callbacks, stop strings and logits need mode='stream'")
    b = len(prompts)
    seeds = jnp.asarray(seed_words(np.broadcast_to(np.asarray(seeds, np.int64), (b,))))
    seen = np.zeros((b, cfg.vocab), bool)
    for r, p in enumerate(prompts):
        seen[r, p] = True
    seen = jnp.asarray(engine.vocab_slice(seen))

    # Programs compile on first use; their compile time is subtracted from the phase it fell in.
    compile0 = engine.compile_seconds
    cache = engine.new_cache(prompts, stopping.max_new_tokens, cache_len, kv_dtype)
    t0 = time.perf_counter()
    logits, cache, state = engine.prefill(prompts, cache, attention)
    logits.block_until_ready()
    t1, compile1 = time.perf_counter(), engine.compile_seconds
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
        attention,
        on_token,
        return_logits,
    )
    t2, compile2 = time.perf_counter(), engine.compile_seconds
    return GenerateResult(
        rows,
        t1 - t0 - (compile1 - compile0),
        t2 - t1 - (compile2 - compile1),
        steps,
        compile2 - compile0,
    )


def loop(
    engine,
    logits,
    cache,
    state,
    seen,
    seeds,
    stopping,
    sampling,
    attention,
    on_token,
    return_logits,
):
    eos = jnp.asarray(list(stopping.eos_ids) or [-1], jnp.int32)
    seqs = stopping.stop_sequences or ((),)
    width = max(1, max(len(s) for s in seqs))
    stops = jnp.asarray([list(s) + [-1] * (width - len(s)) for s in seqs], jnp.int32)
    stop_lens = jnp.asarray([len(s) for s in seqs], jnp.int32)
    static = {
        "cfg": engine.cfg,
        "attention": attention,
        "sampling": sampling,
        "max_new": stopping.max_new_tokens,
    }
    out, reason, n, _ = engine.run(
        loop_fn,
        static,
        (2,),
        engine.params,
        logits,
        cache,
        state,
        seen,
        seeds,
        eos,
        stops,
        stop_lens,
    )
    out, reason = np.asarray(out), np.asarray(reason)
    rows = []
    for r in range(out.shape[0]):
        ids = [int(t) for t in out[r] if t >= 0]
        rows.append(Generation(ids, REASONS.get(int(reason[r]), "length")))
    return rows, max(int(n) - 1, 0)


def stream(
    engine,
    logits,
    cache,
    state,
    seen,
    seeds,
    stopping,
    sampling,
    attention,
    on_token,
    return_logits,
):
    cfg = engine.cfg
    b = logits.shape[0]
    rows = [Generation([], "length") for _ in range(b)]
    done = np.zeros(b, bool)
    steps = 0
    for step in range(stopping.max_new_tokens):
        ids, seen = engine.run(
            sample_fn, {"sampling": sampling}, (), logits, seen, seeds, jnp.int32(step)
        )
        host_ids = np.asarray(ids)
        host_logits = engine.full_logits(logits) if return_logits else None
        for r in np.flatnonzero(~done):
            token = int(host_ids[r])
            rows[r].ids.append(token)
            if return_logits:
                rows[r].logits.append(host_logits[r])
            if on_token:
                on_token(int(r), token)
            reason = stopping.reason(rows[r].ids)
            if reason:
                rows[r].finish_reason, done[r] = reason, True
        if done.all():
            break
        logits, cache = engine.run(
            decode_fn, {"cfg": cfg, "attention": attention}, (2,), engine.params, ids, cache, state
        )
        state = positions.advance(state, 1)
        steps += 1
    return rows, steps
