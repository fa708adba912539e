"""`slimllm bench serve`: `slimllm serve` under a bounded, seeded load of streaming clients.

For each concurrency level (`--batch`, default 1,4,16 clients) every client sends
`--iterations` streaming completions one after another: a shared system-prompt prefix (so
that the prefix cache can serve it) followed by a seeded slice of text of mixed length,
`--new-tokens` tokens each, sampled with a per-request seed. Per level the report gives the
aggregate throughput (completion tokens over the level's wall time), time to first token and
the gap between streamed tokens (p50/p99), and the prefix cache's hit rate over the level
(from /metrics); then the throughput at the highest level over the lowest. The server is
started here (`--model`, default the shipped model, with max batch = the highest level) unless
`--url` names a running one; an untimed round at the highest level compiles its programs
first. `--quick` sends one short request per client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from slimllm.api import SHIPPED_MODEL
from slimllm.reference.errors import OptionError

from .common import log, r3

SYSTEM = (
    "You are the documentation of the Python standard library. Answer with the exact names of "
    "modules, functions and arguments, and with a short example when one helps. "
)
TEXT = (
    "Open the file and return a corresponding file object. If the file cannot be opened, an "
    "OSError is raised. The json module exposes an API familiar to users of the standard "
    "library marshal and pickle modules. Return a new sorted list from the items in iterable. "
    "The collections module implements specialized container datatypes providing alternatives "
    "to the general purpose built-in containers, dict, list, set, and tuple."
).split()


def start_server(model: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "slimllm.cli", "serve", "--model", model, "--port", "0"]
    argv += ["--max-batch", str(max_batch), "--max-queue", str(4 * max_batch)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("slimllm: serving "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe open
            return proc, line.split(" on ")[-1].strip()
    raise OptionError("slimllm serve did not start: " + " ".join("".join(lines).split())[-300:])


def scrape(httpx, url: str) -> dict:
    samples = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def one_request(httpx, url: str, body: dict) -> dict:
    """Stream one completion -> its time to first token, the gaps between tokens, tokens."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise OptionError(f"the server answered {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    gaps = list(np.diff(times)) if len(times) > 1 else []
    return {"ttft": times[0] - t0 if times else None, "gaps": gaps, "tokens": tokens}


def level(httpx, url: str, clients: int, requests: int, new_tokens: int, rng) -> dict:
    """`clients` threads, each sending `requests` streaming completions in turn."""
    bodies = [
        [
            {
                "prompt": SYSTEM + " ".join(TEXT[: int(rng.integers(4, len(TEXT)))]),
                "max_tokens": new_tokens,
                "temperature": 0.8,
                "seed": int(rng.integers(2**31)),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for _ in range(requests)
        ]
        for _ in range(clients)
    ]
    results, errors = [], []

    def client(mine):
        try:
            for body in mine:
                results.append(one_request(httpx, url, body))
        except Exception as err:  # noqa: BLE001 - reported below, after the others finish
            errors.append(err)

    before = scrape(httpx, url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise OptionError(f"a client failed: {errors[0]}")
    after = scrape(httpx, url)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    lookups = grew.get("slimllm_prefix_cache_lookups_total", 0)
    ttft = [r["ttft"] * 1e3 for r in results if r["ttft"] is not None]
    gaps = [g * 1e3 for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)

    def pct(values, q):
        return r3(np.percentile(values, q)) if values else None

    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "seconds": r3(wall),
        "throughput_tokens_per_s": r3(tokens / wall),
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "per_token_ms": {"p50": pct(gaps, 50), "p99": pct(gaps, 99)},
        "prefix_cache": {
            "lookups": int(lookups),
            "hits": int(grew.get("slimllm_prefix_cache_hits_total", 0)),
            "hit_rate": r3(grew.get("slimllm_prefix_cache_hits_total", 0) / lookups)
            if lookups
            else None,
            "reused_tokens": int(grew.get("slimllm_prefix_cache_reused_tokens_total", 0)),
        },
    }


def run(args) -> dict:
    try:
        import httpx
    except ImportError:
        raise OptionError("bench serve needs httpx: pip install 'slimllm[test]'") from None
    levels = sorted(set(args.batch if isinstance(args.batch, tuple) else (args.batch,)))
    requests, new_tokens = (1, 8) if args.quick else (args.iterations, args.new_tokens)
    if requests < 1 or new_tokens < 1:
        raise OptionError("need --iterations >= 1 and --new-tokens >= 1")
    model = args.model or str(SHIPPED_MODEL)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(model, max(levels))
    try:
        # untimed: the highest level once, so that its programs (prefill lengths, samplers)
        # are compiled before any level is timed
        level(httpx, url, max(levels), 1, new_tokens, np.random.default_rng(1))
        rng = np.random.default_rng(0)
        report = {}
        for clients in levels:
            log(f"serve: {clients} clients x {requests} requests of {new_tokens} tokens")
            report[str(clients)] = level(httpx, url, clients, requests, new_tokens, rng)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    low, high = report[str(levels[0])], report[str(levels[-1])]
    return {
        "kind": "serve",
        "url": args.url,
        "model": None if args.url else model,
        "settings": {
            "requests_per_client": requests,
            "new_tokens": new_tokens,
            "quick": args.quick,
        },
        "levels": report,
        f"throughput_{levels[-1]}_over_{levels[0]}": r3(
            high["throughput_tokens_per_s"] / low["throughput_tokens_per_s"]
        ),
    }


def summary(report: dict) -> str:
    lines = ["clients  tokens/s   TTFT p50/p99 ms   per-token p50/p99 ms   prefix hit rate"]
    for n, r in report["levels"].items():
        t, g = r["ttft_ms"], r["per_token_ms"]
        lines.append(
            f"{n:>7}  {r['throughput_tokens_per_s']:>8.1f}   {t['p50']}/{t['p99']}"
            f"   {g['p50']}/{g['p99']}   {r['prefix_cache']['hit_rate']}"
        )
    ratio = [k for k in report if k.startswith("throughput_")][0]
    lines.append(f"{ratio}: {report[ratio]}")
    return "\n".join(lines)
