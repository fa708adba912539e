"""Continuous batching (jaxbackend/batching.py) on the shipped model: every request computes what
it computes alone with `slimllm.generate` (greedy and seeded, every processor, float32 and int8
caches), while others join, leave, queue, are cancelled, or prefill long prompts in chunks; the
prefix store reuses shared first tokens (int8 scales with them) without changing a result."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import slimllm
from slimllm.jaxbackend.batching import (
    MIN_REUSE,
    Entry,
    PrefixStore,
    QueueFull,
    Request,
    Scheduler,
)
from slimllm.reference.errors import OptionError
from slimllm.reference.generate import Stopping
from slimllm.reference.sampling import SamplingConfig

PROMPTS = [
    "Open the file",
    "Return the list of",
    "The socket module provides access to the BSD socket interface. It is available on",
    "class",
    "Raise ValueError if",
    "This function",
]
SETTINGS = [
    dict(),
    dict(temperature=0.8, top_p=0.95),
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, min_p=0.1, repetition_penalty=1.2),
    dict(repetition_penalty=1.3),
    dict(temperature=1.2, top_k=40, top_p=0.9, min_p=0.02),
]
SYSTEM = "You are a careful assistant who answers questions about the Python standard library. "


@pytest.fixture(scope="module")
def model():
    return slimllm.load(slimllm.SHIPPED_MODEL)


class Collector:
    """Events of submitted requests, by name; `wait` until all have ended."""

    def __init__(self):
        self.events: dict[str, list] = {}
        self.ended = threading.Condition()

    def on_event(self, name):
        self.events[name] = []
        self.times = getattr(self, "times", {})
        self.times[name] = []

        def on(event):
            with self.ended:
                self.events[name].append(event)
                self.times[name].append(time.perf_counter())
                self.ended.notify_all()

        return on

    def done(self, name) -> bool:
        events = self.events.get(name)
        return bool(events) and events[-1].finish_reason is not None

    def wait(self, names, timeout=120.0):
        with self.ended:
            assert self.ended.wait_for(lambda: all(self.done(n) for n in names), timeout)

    def ids(self, name):
        return [e.token for e in self.events[name] if e.token is not None]


def request(model, collector, name, prompt, max_new, settings, seed=0, logprobs=None, eos=None):
    stopping = Stopping(max_new, model.eos_ids if eos is None else eos)
    return Request(
        model.tokenizer.encode(prompt),
        stopping,
        SamplingConfig(**settings),
        seed,
        logprobs,
        collector.on_event(name),
    )


def alone(model, prompt, max_new, settings, seed=0, kv="float32", **options):
    return slimllm.generate(
        model, prompt, max_new_tokens=max_new, seed=seed, kv_dtype=kv, **settings, **options
    )


@pytest.mark.parametrize("kv", ["float32", "int8"])
def test_requests_that_share_the_batch_compute_what_they_compute_alone(model, kv):
    # 6 requests, 3 slots: some queue, some join while others run, some stop early (eos)
    sched = Scheduler(model, slimllm.Runtime(kv_dtype=kv), max_batch=3, prefill_chunk=16)
    sched.start()
    col = Collector()
    names = []
    for i, (prompt, settings) in enumerate(zip(PROMPTS, SETTINGS, strict=True)):
        sched.submit(request(model, col, str(i), prompt, 12 + 9 * i, settings, seed=100 + i))
        names.append(str(i))
        if i == 2:
            time.sleep(0.3)  # the later ones arrive while the first run
    col.wait(names)
    metrics = sched.metrics()
    sched.shutdown()
    assert metrics["running"] == 0 and metrics["queue"] == 0
    assert metrics["decode_steps"] < sum(len(col.ids(n)) for n in names)  # really batched
    for i, (prompt, settings) in enumerate(zip(PROMPTS, SETTINGS, strict=True)):
        out = alone(model, prompt, 12 + 9 * i, settings, seed=100 + i, kv=kv)
        assert col.ids(str(i)) == out.ids[0], (i, settings)
        assert col.events[str(i)][-1].finish_reason == out.finish_reasons[0]


@pytest.mark.parametrize("attention", ["naive", "slim"])
def test_pure_xla_attention_reads_only_the_rows_it_decodes(model, attention):
    # without the compiled kernels, attention slices the decoded rows out of the slot cache
    rt = slimllm.Runtime(kernels="xla", attention=attention)
    sched = Scheduler(model, rt, max_batch=4)
    sched.start()
    col = Collector()
    for i in range(3):  # 3 running of 4 slots, then fewer: batches 4, 2 and 1
        sched.submit(request(model, col, str(i), PROMPTS[i], 10 + 12 * i, SETTINGS[i], seed=i))
    col.wait(["0", "1", "2"])
    sched.shutdown()
    for i in range(3):
        settings = dict(SETTINGS[i], kernels="xla", attention=attention)
        assert col.ids(str(i)) == alone(model, PROMPTS[i], 10 + 12 * i, settings, seed=i).ids[0]


def test_a_long_prompt_prefills_in_chunks_while_others_stream(model):
    sched = Scheduler(model, max_batch=2, prefill_chunk=16)
    sched.start()
    col = Collector()
    sched.submit(request(model, col, "short", "Open the file", 80, {}, eos=()))
    while not col.events["short"]:
        time.sleep(0.01)
    long_prompt = " ".join(PROMPTS * 3)
    chunks = -(-len(model.tokenizer.encode(long_prompt)) // 16)
    submitted = time.perf_counter()
    sched.submit(request(model, col, "long", long_prompt, 8, {}))
    col.wait(["short", "long"])
    sched.shutdown()
    # the short request got a token between each two chunks of the long one's prefill
    first_long = col.times["long"][0]
    between = [t for t in col.times["short"] if submitted < t < first_long]
    assert chunks >= 5 and len(between) >= chunks - 1
    assert col.ids("short") == alone(model, "Open the file", 80, {}, eos_ids=()).ids[0]
    assert col.ids("long") == alone(model, long_prompt, 8, {}).ids[0]


@pytest.mark.parametrize("kv", ["float32", "int8"])
def test_a_shared_system_prompt_is_reused_and_changes_no_result(model, kv):
    sched = Scheduler(model, slimllm.Runtime(kv_dtype=kv), max_batch=2)
    sched.start()
    col = Collector()
    questions = ["How do I open a file?", "What does the socket module do?", "Explain os.path."]
    for i, q in enumerate(questions):
        sched.submit(request(model, col, str(i), SYSTEM + q, 16, {}))
        col.wait([str(i)])  # one after another: each finds the previous prompt stored
    metrics = sched.metrics()
    sched.shutdown()
    shared = len(model.tokenizer.encode(SYSTEM)) - 1  # the last token may merge with the next
    assert metrics["prefix_lookups"] == 3 and metrics["prefix_hits"] == 2
    assert metrics["prefix_tokens_reused"] >= 2 * shared
    assert metrics["prefilled_tokens"] == metrics["prompt_tokens"] - metrics["prefix_tokens_reused"]
    for i, q in enumerate(questions):
        assert col.ids(str(i)) == alone(model, SYSTEM + q, 16, {}, kv=kv).ids[0]


def test_reused_int8_entries_carry_their_scales(model):
    # the staging cache after a prefix hit holds the entries a fresh prefill writes, scales too
    rt = slimllm.Runtime(kv_dtype="int8")
    sched = Scheduler(model, rt, max_batch=1)
    prompt = np.array(model.tokenizer.encode(SYSTEM + "Tell me about json."))
    other = model.tokenizer.encode(" ".join(PROMPTS * 2))  # overwrites the staging cache between
    assert len(other) > len(prompt)
    fresh = Scheduler(model, rt, max_batch=1, prefix_cache_tokens=0)
    for s in (sched, fresh):
        s.start()
        col = Collector()
        for name, ids in (("a", prompt[:-3]), ("other", other), ("b", prompt)):
            s.submit(Request(list(ids), Stopping(1), on_event=col.on_event(name)))
            col.wait([name])
        s.shutdown()
    assert sched.metrics()["prefix_hits"] == 1 and fresh.metrics()["prefix_hits"] == 0
    n = len(prompt) - 3
    for name in ("k_scale", "v_scale", "k", "v"):
        for reused, computed in zip(getattr(sched.cache, name), getattr(fresh.cache, name)):
            reused, computed = np.asarray(reused)[0, :, :n], np.asarray(computed)[0, :, :n]
            assert np.any(reused != 0)
            # the entries were computed by prefills of other lengths: equal up to float rounding
            tol = dict(atol=1) if reused.dtype == np.int8 else dict(rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                reused.astype(np.float32), computed.astype(np.float32), **tol
            )


def test_logprobs_are_generates(model):
    sched = Scheduler(model, max_batch=2)
    sched.start()
    col = Collector()
    sched.submit(request(model, col, "a", "Open the file", 6, {}, logprobs=3))
    sched.submit(request(model, col, "b", "Return", 6, dict(temperature=0.9), 5, logprobs=0))
    col.wait(["a", "b"])
    sched.shutdown()
    for name, prompt, settings, seed, n in (
        ("a", "Open the file", {}, 0, 3),
        ("b", "Return", dict(temperature=0.9), 5, 0),
    ):
        out = alone(model, prompt, 6, settings, seed=seed, return_logits=True)
        events = [e for e in col.events[name] if e.token is not None]
        assert [e.token for e in events] == out.ids[0]
        for event, logits, token in zip(events, out.logits[0], out.ids[0], strict=True):
            expect = logits - np.logaddexp.reduce(logits.astype(np.float64))
            assert event.logprob == pytest.approx(expect[token], abs=1e-4)
            assert len(event.top_logprobs) == n
            assert [t for t, _ in event.top_logprobs] == list(
                np.argsort(-expect, kind="stable")[:n]
            )
        if n:
            assert events[0].top_logprobs[0][0] == out.ids[0][0]  # greedy takes the top one


def test_cancelling_frees_the_slot_and_leaves_the_others_alone(model):
    sched = Scheduler(model, max_batch=2)
    sched.start()
    col = Collector()
    victim = sched.submit(request(model, col, "victim", "Open the file", 200, {}))
    other = sched.submit(
        request(model, col, "other", "Return the list of", 40, dict(temperature=0.8))
    )
    sched.submit(request(model, col, "queued", "class", 10, {}))  # waits for a free slot
    while len(col.events["victim"]) < 3:
        time.sleep(0.01)
    sched.cancel(victim)
    col.wait(["victim", "other", "queued"])
    metrics = sched.metrics()
    sched.shutdown()
    assert col.events["victim"][-1].finish_reason == "cancelled"
    assert other.slot == 0  # moved into the victim's slot: the decode batch shrank to 1
    assert len(col.ids("victim")) < 200
    assert metrics["running"] == 0 and metrics["finished"]["cancelled"] == 1
    out = alone(model, "Return the list of", 40, dict(temperature=0.8))
    assert col.ids("other") == out.ids[0]
    assert col.ids("queued") == alone(model, "class", 10, {}).ids[0]


def test_a_listener_that_fails_ends_only_its_request(model):
    sched = Scheduler(model, max_batch=2)
    sched.start()
    col = Collector()

    def broken(event):
        raise ConnectionResetError("client went away")

    sched.submit(Request(model.tokenizer.encode("Open"), Stopping(50), on_event=broken))
    sched.submit(request(model, col, "ok", "Return the list of", 20, {}))
    col.wait(["ok"])
    deadline = time.time() + 30
    while sched.metrics()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert sched.metrics()["running"] == 0
    sched.shutdown()
    assert col.ids("ok") == alone(model, "Return the list of", 20, {}).ids[0]


def test_bad_requests_and_a_full_queue_are_refused(model):
    sched = Scheduler(model, max_batch=1, max_queue=1, cache_len=64)
    ids = model.tokenizer.encode("Open the file")
    with pytest.raises(OptionError, match="longer than the cache"):
        sched.check(Request(ids, Stopping(100)))
    with pytest.raises(OptionError, match="logprobs"):
        sched.check(Request(ids, Stopping(4), logprobs=21))
    with pytest.raises(OptionError, match="outside the vocabulary"):
        sched.check(Request([5, 10**6], Stopping(4)))
    sched.submit(Request(ids, Stopping(4)))  # not started: it waits in the queue
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit(Request(ids, Stopping(4)))
    with pytest.raises(OptionError, match="cache_len"):
        Scheduler(model, cache_len=10**6)
    with pytest.raises(OptionError, match="JAX backend"):
        Scheduler(model, slimllm.Runtime(backend="numpy"))
    with pytest.raises(OptionError, match="max_batch"):
        Scheduler(model, max_batch=0)


def test_shutdown_drains_running_requests_then_refuses_new_ones(model):
    sched = Scheduler(model, max_batch=2)
    sched.start()
    col = Collector()
    sched.submit(request(model, col, "a", "Open the file", 30, {}))
    sched.submit(request(model, col, "b", "class", 30, dict(temperature=0.9)))
    sched.shutdown(drain=True, timeout=60)
    assert col.done("a") and col.done("b")
    assert col.events["a"][-1].finish_reason in ("length", "eos")
    with pytest.raises(QueueFull, match="shutting down"):
        sched.submit(Request(model.tokenizer.encode("x"), Stopping(2)))
    assert not sched.alive()


def test_shutdown_without_drain_ends_running_requests_with_a_final_event(model):
    sched = Scheduler(model, max_batch=1)
    sched.start()
    col = Collector()
    sched.submit(request(model, col, "a", "Open the file", 200, {}))
    sched.submit(request(model, col, "queued", "class", 10, {}))
    while len(col.events["a"]) < 2:
        time.sleep(0.01)
    sched.shutdown(drain=False)
    assert col.events["a"][-1].finish_reason == "cancelled"
    assert col.events["queued"] and col.events["queued"][-1].finish_reason == "cancelled"


def entry(tokens, slots=16):
    return Entry(np.array(tokens), 1.0, np.zeros((1, 1, slots, 1)))


def test_prefix_store_finds_the_longest_shared_run_and_keeps_to_its_budget():
    store = PrefixStore(budget=64)
    base = list(range(100, 100 + MIN_REUSE + 4))
    store.add(entry(base[: MIN_REUSE + 2], 32))
    store.add(entry(list(range(MIN_REUSE + 8)), 32))
    hit, run = store.match(np.array(base + [7, 8]), 1.0)
    assert hit.tokens.tolist() == base[: MIN_REUSE + 2] and run == MIN_REUSE + 2
    assert store.match(np.array(base[: MIN_REUSE - 1] + [0, 0]), 1.0) == (None, 0)  # too short
    assert store.match(np.array(base + [1]), 2.0) == (None, 0)  # other NTK alpha
    # at most all but the last token: it must be computed for its logits
    _, run = store.match(np.array(base[: MIN_REUSE + 2]), 1.0)
    assert run == MIN_REUSE + 1
    store.add(entry(base + [9], 32))  # extends the first entry: replaces it
    assert len(store.entries) == 2 and store.slots == 64
    store.add(entry(list(range(50, 80)), 32))  # over budget: the least recently used goes
    assert store.slots == 64
    assert [e.tokens[0] for e in store.entries.values()] == [100, 50]
    assert store.hits == 2 and store.lookups == 4


def test_tensor_parallel_slots_compute_what_tp_generate_computes(model):
    # tp=2 over the two XLA devices conftest gives this process: the sampler gathers the
    # vocabulary slices, the penalty and the seen marks stay on each rank's slice
    rt = slimllm.Runtime(tp=2, kv_dtype="int8")
    sched = Scheduler(model, rt, max_batch=2)
    sched.start()
    col = Collector()
    cases = [
        ("a", "Open the file", {}, 3),
        ("b", "Return the list of", dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2), 2),
        ("c", "class", dict(temperature=0.8), None),
    ]
    for name, prompt, settings, n in cases:
        sched.submit(request(model, col, name, prompt, 24, settings, seed=7, logprobs=n))
    col.wait([c[0] for c in cases])
    sched.shutdown()
    for name, prompt, settings, n in cases:
        out = alone(model, prompt, 24, settings, seed=7, kv="int8", tp=2, logprobs=n)
        assert col.ids(name) == out.ids[0], name
        events = [e for e in col.events[name] if e.token is not None]
        if n is not None:
            for event, want in zip(events, out.logprobs[0], strict=True):
                assert event.logprob == pytest.approx(want.logprob, abs=1e-5)
                assert [t for t, _ in event.top_logprobs] == [t for t, _ in want.top]
