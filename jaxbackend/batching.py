"""Continuous batching: many requests in the fixed batch slots of one compiled decode program.

A `Scheduler` owns a KV cache of `max_batch` rows, one slot per running request, and a thread
that repeats one step: admit waiting requests into free slots, prefill them, then run one decode
step for every running slot and hand each its new token. A request joins at the next step after
its prefill and leaves the step it stops (or is cancelled): slots never wait for each other.

Each request computes what it would alone (`generate.generate` with the same settings):
- its prompt is prefilled alone, at batch 1, by generate's own program (`prefill_fn`, the prompt
  padded to the same bucket, a cache of the same length), into a staging cache whose row is
  then copied into the request's slot (`insert_fn`);
- the decode step is generate's own `decode_fn`, over the first b slots (b the power of two,
  at most `max_batch`, that covers the running ones: running requests are kept in the lowest
  slots, moved down as others end, so a lone request decodes at batch 1; attention reads rows
  [0, b) of the slot cache in place), and every row of it depends on its own cache row and
  position only;
- the sampler takes per-row settings (`RowSampling`) and runs, row by row, the same processors on
  the same float32 values as `sampling.sample` (a processor a row does not use is computed
  for the batch and discarded for that row with `jnp.where`), with the row's own seed and step:
  the counter-based draws are the ones it makes alone.
A prompt longer than `prefill_chunk` is prefilled in chunks between decode steps, so running
streams keep moving; those chunks read their prefix back from the cache, so its results may
differ from a one-shot prefill in the last bits of the float sums.

Prefix reuse: a finished prefill leaves its prompt's KV entries (values and, for int8, their
scales: every leaf of the cache) in a `PrefixStore`. A later prompt that starts with the same
tokens copies the longest matching run of them into its staging cache and prefills only the
rest. Entries are valid for any prompt sharing their first tokens because a token's keys and
values depend only on it and the tokens before it (for models whose positions are read off the
whole prompt, prefix-LM and dynamic NTK, see `reusable`). Memory is bounded by a token budget,
the least recently used entry evicted first.

The scheduler runs on the JAX backend, in one process (tp over this process's devices too).
All JAX calls happen on its thread; `submit` and `cancel` are safe from any thread and
`on_event` is called on the scheduler's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from slimllm.reference import positions as ref_positions
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.generate import Stopping, check_request, seed_array
from slimllm.reference.logprobs import check_logprobs
from slimllm.reference.sampling import SamplingConfig, is_integer

from . import positions
from .engine import Engine, bucket, program_runtime
from .generate import decode_fn, prefill_fn
from .kv_cache import padded_len
from .logprobs import token_logprobs
from .runtime import Runtime
from .sampling import (
    choose,
    drop_tail,
    first_argmax,
    min_p_filter,
    repetition_penalty,
    seed_words,
    static,
    top_k_filter,
    uniform,
)
from .tp import SINGLE, gather_vocab, mark_seen

__all__ = ["Event", "QueueFull", "Request", "Scheduler", "Ticket"]

DEFAULT_CACHE_LEN = 2048  # slots per request when the model's context is longer
MIN_REUSE = 16  # shared first tokens worth a copy instead of their prefill


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests, or the scheduler is shutting down: not the
    request's fault (an HTTP 429 or 503, not a 400)."""


@dataclass
class Event:
    """One step of a request: its new token (with its log-probability and top alternatives if
    asked), and on the last event why it ended: "length", "eos", "stop" or "cancelled"."""

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Request:
    """A prompt (token ids) and how to continue it; `on_event` is called on the scheduler's
    thread for every token, then once with a finish reason (possibly on the token's event)."""

    prompt: list[int]
    stopping: Stopping
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    logprobs: int | None = None  # None: off; n: the chosen token's and the top n alternatives'
    on_event: Callable[[Event], None] = lambda event: None


@dataclass(eq=False)
class Ticket:
    """A submitted request as the scheduler tracks it (`cancel` takes it)."""

    request: Request
    ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    slot: int | None = None


# ---------------------------------------------------------------- per-row sampling


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSampling:
    """Each row's `SamplingConfig` as arrays [b, 1] (traced), and which processors any row
    uses (static): the `Sampling` of generate.py, one setting per row."""

    temperature: jax.Array  # float32 [b,1]; 1 for greedy rows (their scaled scores are unused)
    top_k: jax.Array  # int32 [b,1]; 0 off
    top_p_tail: jax.Array  # float32 [b,1]: float32(1 - top_p)
    min_p: jax.Array  # float32 [b,1]
    repetition_penalty: jax.Array  # float32 [b,1]; 1 changes nothing (x * 1 == x / 1 == x)
    greedy: jax.Array  # bool [b]
    top_p_on: jax.Array  # bool [b]
    min_p_on: jax.Array  # bool [b]
    penalised: bool = static(False)
    sampled: bool = static(False)
    any_top_k: bool = static(False)
    any_top_p: bool = static(False)
    any_min_p: bool = static(False)

    @classmethod
    def of(cls, configs: list[SamplingConfig]) -> RowSampling:
        f32 = np.float32

        def column(values, dtype):
            return np.array(values, dtype)[:, None]

        greedy = np.array([c.greedy for c in configs])
        sampled = ~greedy
        top_p_on = sampled & np.array([c.top_p < 1.0 for c in configs])
        min_p_on = sampled & np.array([c.min_p > 0.0 for c in configs])
        top_k = [c.top_k if not c.greedy else 0 for c in configs]
        return cls(
            column([1.0 if c.greedy else c.temperature for c in configs], f32),
            column([min(k, np.iinfo(np.int32).max) for k in top_k], np.int32),
            column([f32(1.0 - c.top_p) for c in configs], f32),
            column([c.min_p for c in configs], f32),
            column([c.repetition_penalty for c in configs], f32),
            greedy,
            top_p_on,
            min_p_on,
            penalised=any(c.repetition_penalty != 1.0 for c in configs),
            sampled=bool(sampled.any()),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=bool(top_p_on.any()),
            any_min_p=bool(min_p_on.any()),
        )


def sample_rows(logits, rows: RowSampling, seen, seeds, steps):
    """Next id per row [b] from full raw logits [b,v]: each row as `sampling.sample` would
    choose it with its own settings, seed and step."""
    scores = logits.astype(jnp.float32)
    if rows.penalised:
        scores = repetition_penalty(scores, seen, rows.repetition_penalty)
    best = first_argmax(scores)  # [b,v] -> [b]
    if not rows.sampled:
        return best
    scores = scores / rows.temperature
    if rows.any_top_k:
        scores = top_k_filter(scores, rows.top_k)  # [b,1]: each row's k
    if rows.any_top_p:
        scores = jnp.where(rows.top_p_on[:, None], drop_tail(scores, rows.top_p_tail), scores)
    if rows.any_min_p:
        scores = jnp.where(rows.min_p_on[:, None], min_p_filter(scores, rows.min_p), scores)
    drawn = choose(scores, uniform(seeds, steps)).astype(jnp.int32)
    return jnp.where(rows.greedy, best, drawn)


def serve_sample_fn(logits, seen, seeds, steps, rows, *, logprobs: int | None, comm=SINGLE):
    """Choose ids [b] from logits [b,v] (this rank's slice [b,v/R] under tp: the penalty is
    applied to the slice, the rest to the gathered vocabulary), mark them in the first b rows
    of seen [B,v], and unless `logprobs` is None return each row's (chosen log-probability
    [b], top ids [b,n], their log-probabilities [b,n]) from the raw logits."""
    b = logits.shape[0]
    scores = logits.astype(jnp.float32)
    if rows.penalised:
        scores = repetition_penalty(scores, seen[:b], rows.repetition_penalty)
    plain = dataclasses.replace(rows, penalised=False)
    ids = sample_rows(gather_vocab(scores, comm), plain, None, seeds, steps)  # [b]
    seen = mark_seen(seen, ids, comm)
    extra = () if logprobs is None else token_logprobs(logits, ids, logprobs, comm)
    return ids, seen, extra


# ---------------------------------------------------------------- moving cache rows


def insert_fn(cache, staging, slot, *, comm=SINGLE):
    """Row 0 of `staging` written into row `slot` of `cache` (every leaf: values, scales)."""

    def put(big, row):
        return lax.dynamic_update_slice_in_dim(big, row, slot, axis=0)

    return jax.tree_util.tree_map(put, cache, staging)


def move_fn(cache, seen, src, dst, *, comm=SINGLE):
    """Row `src` of the cache (every leaf) and of seen [B,v] copied to row `dst`."""

    def move(x):
        return lax.dynamic_update_slice_in_dim(x, lax.dynamic_slice_in_dim(x, src, 1), dst, 0)

    return jax.tree_util.tree_map(move, cache), move(seen)


def take_prefix_fn(staging, *, length: int, comm=SINGLE):
    """The first `length` slots of every leaf of a batch-1 cache (a prefix-store entry)."""
    return jax.tree_util.tree_map(lambda x: x[:, :, :length], staging)


def put_prefix_fn(staging, entry, *, comm=SINGLE):
    """A prefix-store entry written into the first slots of the staging cache."""

    def put(leaf, part):
        return lax.dynamic_update_slice_in_dim(leaf, part, 0, axis=2)

    return jax.tree_util.tree_map(put, staging, entry)


def set_row_fn(seen, row, slot, *, comm=SINGLE):
    """seen [b,v] with row `slot` replaced by row [1,v] (a new request's prompt tokens)."""
    return lax.dynamic_update_slice_in_dim(seen, row, slot, axis=0)


# ---------------------------------------------------------------- the prefix store


def reusable(cfg: ModelConfig) -> bool:
    """Can a prompt's first KV entries serve another prompt that starts with the same tokens,
    and its prefill be cut into chunks? Not when a token's keys depend on later prompt tokens:
    a prefix-LM prompt attends both ways; dynamic NTK is keyed by the alpha instead."""
    return not cfg.prefix_lm


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # the prompt tokens whose KV entries it holds
    alpha: float  # dynamic-NTK alpha the entries were computed with
    cache: object  # batch-1 cache leaves of `slots` slots (>= len(tokens))


class PrefixStore:
    """KV entries of recent prompts, at most `budget` token slots, least recently used out."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self.hits = self.lookups = self.reused = 0

    @property
    def slots(self) -> int:
        return sum(leaf_slots(e) for e in self.entries.values())

    def match(self, prompt: np.ndarray, alpha: float) -> tuple[Entry | None, int]:
        """The entry sharing the longest run of first tokens with `prompt` (at most all but its
        last token, which must be computed for its logits), and that run's length."""
        self.lookups += 1
        best, best_n = None, 0
        for key, entry in self.entries.items():
            if entry.alpha != alpha:
                continue
            n = min(len(entry.tokens), len(prompt) - 1)
            same = entry.tokens[:n] == prompt[:n]
            run = n if same.all() else int(np.argmin(same))
            if run >= MIN_REUSE and run > best_n:
                best, best_n = key, run
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused += best_n
        return self.entries[best], best_n

    def add(self, entry: Entry) -> None:
        """Keep `entry`, dropping entries whose tokens it extends, then the oldest over budget."""
        if leaf_slots(entry) > self.budget:
            return
        for key, old in list(self.entries.items()):
            n = len(old.tokens)
            if n <= len(entry.tokens) and np.array_equal(entry.tokens[:n], old.tokens):
                del self.entries[key]
        self.entries[id(entry)] = entry
        while self.slots > self.budget:
            self.entries.popitem(last=False)


def leaf_slots(entry: Entry) -> int:
    return jax.tree_util.tree_leaves(entry.cache)[0].shape[2]


# ---------------------------------------------------------------- the scheduler


@dataclass
class Slot:
    ticket: Ticket
    state: ref_positions.SeqState  # host, batch 1
    token: int  # the input of the next decode step
    step: int  # the sampler's counter for the next draw


class Scheduler:
    """Continuous batching of `Request`s on one model (module docstring)."""

    def __init__(
        self,
        model,
        rt: Runtime = Runtime(),
        max_batch: int = 8,
        cache_len: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        prefix_cache_tokens: int | None = None,
    ):
        limits = [("max_batch", max_batch, 1), ("max_queue", max_queue, 0)]
        limits += [("prefill_chunk", prefill_chunk, 16)]
        if prefix_cache_tokens is not None:  # None: the default budget
            limits += [("prefix_cache_tokens", prefix_cache_tokens, 0)]
        for name, value, low in limits:
            if not is_integer(value) or value < low:
                raise OptionError(f"{name} must be an integer >= {low}, got {value!r}")
        if rt.backend != "jax":
            raise OptionError("serving runs on the JAX backend (backend 'jax')")
        rt = model.placed(rt)
        if rt.tp > 1 and rt.transport != "devices":
            raise OptionError("serving runs in one process: use tp over devices, not mpiexec")
        cfg = model.cfg
        self.model, self.cfg, self.rt = model, cfg, rt
        self.engine: Engine = model.engine(rt)
        self.cache_len = min(cfg.max_len, DEFAULT_CACHE_LEN) if cache_len is None else cache_len
        if not is_integer(self.cache_len) or not 2 <= self.cache_len <= cfg.max_len:
            raise OptionError(
                f"cache_len must be an integer in [2, {cfg.max_len}] (the model's context), "
                f"got {cache_len!r}"
            )
        self.slots_per_row = padded_len(self.cache_len)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk = bucket(prefill_chunk) if reusable(cfg) else None
        budget = 4 * self.cache_len if prefix_cache_tokens is None else prefix_cache_tokens
        self.prefixes = PrefixStore(budget) if reusable(cfg) and budget > 0 else None
        self.static = {"cfg": cfg, "rt": program_runtime(rt)}

        self.lock = threading.Condition()
        self.queue: collections.deque[Ticket] = collections.deque()
        self.running: list[Slot | None] = [None] * max_batch
        self.closing = self.stopping = False
        self.thread: threading.Thread | None = None
        self.counts = collections.Counter()
        self.error: BaseException | None = None

        self.cache = self.engine.new_cache(max_batch, self.cache_len, rt.kv_dtype)
        self.staging = self.engine.new_cache(1, self.cache_len, rt.kv_dtype)
        self.seen = self.engine.place((jnp.zeros((max_batch, cfg.vocab), bool),), ("vocab",))[0]

    # -------------------------------------------------------- the public interface

    def check(self, request: Request) -> None:
        """An OptionError naming what is wrong with `request` (prompt, budget, options)."""
        if not isinstance(request.stopping, Stopping):
            raise OptionError("stopping must be a Stopping")
        if not isinstance(request.sampling, SamplingConfig):
            raise OptionError("sampling must be a SamplingConfig")
        check_request(self.cfg, [request.prompt], request.stopping, request.seed, self.cache_len)
        check_logprobs(request.logprobs, self.cfg.vocab)

    def submit(self, request: Request) -> Ticket:
        """Queue `request` (checked first) -> its ticket; QueueFull when no room or closing."""
        self.check(request)
        ticket = Ticket(request)
        with self.lock:
            if self.error is not None:
                raise QueueFull(f"the scheduler stopped after an error: {self.error!r}")
            if self.closing:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.queue.append(ticket)
            self.counts["submitted"] += 1
            self.lock.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """End `ticket`'s request at the next step boundary; its slot is free for the next."""
        with self.lock:
            ticket.cancelled = True
            self.lock.notify()

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.serve, name="slimllm-scheduler")
            self.thread.daemon = True
            self.thread.start()

    def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new requests; with `drain`, let queued and running ones finish for up to
        `timeout` seconds; then cancel what is left and stop the thread."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        deadline = time.monotonic() + timeout
        while drain and self.busy() and time.monotonic() < deadline and self.alive():
            time.sleep(0.01)
        with self.lock:
            for ticket in [*self.queue, *(s.ticket for s in self.running if s)]:
                ticket.cancelled = True
            self.stopping = True
            self.lock.notify()
        if self.alive():
            self.thread.join(timeout=max(5.0, timeout))
        else:  # never started, or failed: what waits still gets its final event
            self.drop_cancelled()

    def busy(self) -> bool:
        return bool(self.queue) or any(self.running)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def metrics(self) -> dict:
        """Counters and gauges for /metrics."""
        store = self.prefixes
        with self.lock:
            return {
                "queue": len(self.queue),
                "running": sum(s is not None for s in self.running),
                "max_batch": self.max_batch,
                "generated_tokens": self.counts["generated"],
                "prompt_tokens": self.counts["prompt"],
                "prefilled_tokens": self.counts["prefilled"],
                "decode_steps": self.counts["steps"],
                "finished": {k[9:]: v for k, v in self.counts.items() if k.startswith("finished:")},
                "prefix_hits": store.hits if store else 0,
                "prefix_lookups": store.lookups if store else 0,
                "prefix_tokens_reused": store.reused if store else 0,
                "prefix_slots": store.slots if store else 0,
            }

    # -------------------------------------------------------- the scheduler's thread

    def serve(self) -> None:
        """The scheduler's loop: admit, then one decode step, until shut down and empty."""
        try:
            while True:
                with self.lock:
                    while not (self.queue or any(self.running) or self.stopping):
                        self.lock.wait()
                    if self.stopping and not self.busy():
                        return
                self.drop_cancelled()
                self.admit()
                if any(self.running):
                    self.step()
        except BaseException as err:  # a failure of the engine ends every request, loudly
            self.error = err
            with self.lock:
                tickets = [*self.queue, *(s.ticket for s in self.running if s)]
                self.queue.clear()
                self.running = [None] * self.max_batch
            for ticket in tickets:
                self.finish(ticket, "cancelled")
            raise

    def drop_cancelled(self) -> None:
        with self.lock:
            waiting = [t for t in self.queue if t.cancelled]
            for ticket in waiting:
                self.queue.remove(ticket)
            slots = [i for i, s in enumerate(self.running) if s and s.ticket.cancelled]
            for i in slots:
                waiting.append(self.running[i].ticket)
                self.running[i] = None
        for ticket in waiting:
            self.finish(ticket, "cancelled")

    def admit(self) -> None:
        """Prefill waiting requests into free slots (one at a time, through the staging cache)."""
        while True:
            with self.lock:
                free = [i for i, s in enumerate(self.running) if s is None]
                if not free or not self.queue:
                    return
                ticket = self.queue.popleft()
            if ticket.cancelled:
                self.finish(ticket, "cancelled")
                continue
            self.prefill(ticket, free[0])

    def prefill(self, ticket: Ticket, slot: int) -> None:
        """The prompt's KV entries into row `slot` of the cache, its first token chosen."""
        request, cfg = ticket.request, self.cfg
        prompt = np.asarray(request.prompt, np.int64)
        state = ref_positions.start_state(cfg, [request.prompt])
        alpha = float(state.ntk_alpha[0])
        done = 0
        if self.prefixes is not None:
            entry, done = self.prefixes.match(prompt, alpha)
            if entry is not None:
                self.staging = self.engine.run(put_prefix_fn, {}, (0,), self.staging, entry.cache)
        self.counts["prompt"] += len(prompt)
        self.counts["prefilled"] += len(prompt) - done
        logits = None
        while done < len(prompt):
            end = len(prompt) if self.prefill_chunk is None else done + self.prefill_chunk
            end = min(end, len(prompt))
            width = min(bucket(end - done), self.slots_per_row - done)  # never past the cache
            tokens = np.zeros((1, width), np.int32)
            tokens[0, : end - done] = prompt[done:end]
            chunk_state = dataclasses.replace(state, lengths=np.array([done]))
            logits, self.staging = self.engine.run(
                prefill_fn,
                self.static,
                (2,),
                self.engine.params,
                jnp.asarray(tokens),
                self.staging,
                positions.device_state(chunk_state),
                jnp.asarray([end - done - 1], jnp.int32),
            )
            done = end
            if ticket.cancelled:
                return self.finish(ticket, "cancelled")
            if done < len(prompt) and any(self.running):
                self.step()  # running streams keep moving between the chunks of a long prompt
        if self.prefixes is not None:
            self.keep_prefix(prompt, alpha)
        state.lengths[:] = len(prompt)
        seen = np.zeros((1, cfg.vocab), bool)
        seen[0, prompt] = True
        seen = self.engine.place((jnp.asarray(seen),), ("vocab",))[0]
        ids, seen_row, extra = self.sample(logits, seen, [request], [0], logprobs=request.logprobs)
        self.cache = self.engine.run(insert_fn, {}, (0,), self.cache, self.staging, slot)
        self.seen = self.engine.run(set_row_fn, {}, (0,), self.seen, seen_row, slot)
        first = Slot(ticket, state, int(ids[0]), 1)
        ticket.slot = slot
        with self.lock:
            self.running[slot] = first
        self.emit(slot, int(ids[0]), extra, 0)

    def keep_prefix(self, prompt: np.ndarray, alpha: float) -> None:
        """Store the staging cache's entries for `prompt` (slots rounded up to a bucket, so
        few entry shapes and few copy programs exist; the slots past the prompt are unused)."""
        slots = min(bucket(len(prompt)), self.slots_per_row)
        part = self.engine.run(take_prefix_fn, {"length": slots}, (), self.staging)
        self.prefixes.add(Entry(prompt.copy(), alpha, part))

    def sample(self, logits, seen, requests, steps, logprobs):
        """Ids [b] (host), the new seen mask, and logprob arrays (host) for `requests`."""
        rows = RowSampling.of([r.sampling for r in requests])
        seeds = seed_words(seed_array([r.seed for r in requests], len(requests)))
        n = logprobs if not logprobs else min(1 << (logprobs - 1).bit_length(), self.cfg.vocab)
        ids, seen, extra = self.engine.run(
            serve_sample_fn,
            {"logprobs": n},
            (),
            logits,
            seen,
            jnp.asarray(seeds),
            jnp.asarray(np.array(steps, np.uint32)),
            rows,
        )
        return np.asarray(ids), seen, tuple(np.asarray(x) for x in extra)

    def step(self) -> None:
        """One decode step for the first b slots (b a power of two, or max_batch, covering every
        running slot: few programs, and a lone request decodes at batch 1), then each running
        slot's next token."""
        last = max(i for i, s in enumerate(self.running) if s is not None)
        b = min(1 << last.bit_length(), self.max_batch)
        slots = self.running[:b]
        ids = np.zeros(b, np.int32)
        lengths, prefix, anchor = (np.zeros(b, np.int64) for _ in range(3))
        alpha = np.ones(b, np.float32)
        requests = [Request([0], Stopping(1))] * b
        steps = [0] * b
        for i, s in enumerate(slots):
            if s is not None:
                ids[i], steps[i], requests[i] = s.token, s.step, s.ticket.request
                lengths[i], prefix[i] = s.state.lengths[0], s.state.prefix[0]
                anchor[i], alpha[i] = s.state.anchor[0], s.state.ntk_alpha[0]
        state = positions.device_state(ref_positions.SeqState(lengths, prefix, anchor, alpha))
        logits, self.cache = self.engine.run(
            decode_fn, self.static, (2,), self.engine.params, jnp.asarray(ids), self.cache, state
        )
        wanted = [r.logprobs for s, r in zip(slots, requests) if s and r.logprobs is not None]
        new, self.seen, extra = self.sample(
            logits, self.seen, requests, steps, max(wanted) if wanted else None
        )
        self.counts["steps"] += 1
        for i, s in enumerate(slots):
            if s is None:
                continue
            s.state.lengths += 1
            s.token, s.step = int(new[i]), s.step + 1
            self.emit(i, int(new[i]), extra, i)
        self.compact()

    def compact(self) -> None:
        """Move the last running slots into free ones below them, so the decode batch shrinks
        as requests end (one cache row copied per move)."""
        while True:
            with self.lock:
                used = [i for i, s in enumerate(self.running) if s is not None]
                free = [i for i, s in enumerate(self.running) if s is None]
                if not used or not free or free[0] > used[-1]:
                    return
                src, dst = used[-1], free[0]
                self.running[dst], self.running[src] = self.running[src], None
                self.running[dst].ticket.slot = dst
            self.cache, self.seen = self.engine.run(
                move_fn, {}, (0, 1), self.cache, self.seen, src, dst
            )

    def emit(self, slot: int, token: int, extra, row: int) -> None:
        """Hand the request in `slot` its new token; free the slot if that token ends it."""
        s = self.running[slot]
        ticket, request = s.ticket, s.ticket.request
        ticket.ids.append(token)
        self.counts["generated"] += 1
        reason = request.stopping.reason(ticket.ids)
        event = Event(token, finish_reason=reason)
        if request.logprobs is not None and extra:
            chosen, top_ids, top_lp = extra
            n = request.logprobs
            event.logprob = float(chosen[row])
            event.top_logprobs = [
                (int(t), float(p)) for t, p in zip(top_ids[row, :n], top_lp[row, :n])
            ]
        if reason:
            with self.lock:
                self.running[slot] = None
            ticket.finished = True
            self.counts[f"finished:{reason}"] += 1
        self.deliver(ticket, event)

    def finish(self, ticket: Ticket, reason: str) -> None:
        """A final event without a token (a cancelled request)."""
        if ticket.finished:
            return
        ticket.finished = True
        self.counts[f"finished:{reason}"] += 1
        self.deliver(ticket, Event(None, finish_reason=reason))

    def deliver(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.request.on_event(event)
        except Exception:  # a listener's failure (a client gone) ends its request, no other
            ticket.cancelled = True
