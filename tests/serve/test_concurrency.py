"""16 streaming clients at once on a 4-slot server: each gets what its request gets alone,
and clients that leave mid-stream free their slots without disturbing the others."""

# ruff: noqa: F811 - the fixtures imported from serving.py are parameters here
from __future__ import annotations

import json
import threading
import time

import httpx
from serving import model, model_dir, server  # noqa: F401 - fixtures

import slimllm

SETTINGS = [
    {"temperature": 0},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 1.0, "top_k": 20, "repetition_penalty": 1.2},
    {"temperature": 0.7, "min_p": 0.05},
]


def bodies(model_dir) -> list[dict]:
    """16 requests: different prompts (lengths 1 to ~40 tokens), lengths and settings."""
    lines = [l for l in (model_dir / "heldout.txt").read_text().splitlines() if len(l) > 20]
    out = []
    for i in range(16):
        prompt = lines[i * 7][: 8 + 9 * i]
        body = {"prompt": prompt, "max_tokens": 12 + 3 * i, "seed": 100 + i, "stream": True}
        out.append(body | SETTINGS[i % len(SETTINGS)])
    return out


def stream(url: str, body: dict, leave_after: int | None = None) -> dict:
    """Send one streaming request; read all of it, or leave after `leave_after` chunks."""
    text, finish, chunks, done = "", None, 0, False
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                break  # closing the response drops the connection mid-stream
    return {"text": text, "finish": finish, "done": done}


def run_all(url, requests, leave=()) -> list[dict]:
    results = [None] * len(requests)

    def one(i):
        results[i] = stream(url, requests[i], 2 if i in leave else None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return results


def test_concurrent_streams_equal_each_request_alone(server, model_dir, model):
    requests = bodies(model_dir)
    together = run_all(server.url, requests)
    alone = [stream(server.url, body) for body in requests]  # one at a time: batch of one
    assert together == alone
    assert all(r["done"] and r["finish"] in ("length", "stop") for r in together)
    for body, result in list(zip(requests, alone))[:2]:  # and the same as slimllm.generate
        settings = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed") if k in body}
        out = slimllm.generate(model, body["prompt"], max_new_tokens=body["max_tokens"], **settings)
        assert result["text"] == out.text


def test_clients_that_leave_free_their_slots(server, model_dir):
    requests = [body | {"max_tokens": 200} for body in bodies(model_dir)]
    requests = [b | {"prompt": b["prompt"][:20]} for b in requests]  # 200 new tokens fit
    leave = set(range(0, 16, 2))
    results = run_all(server.url, requests, leave)
    stayed = [i for i in range(16) if i not in leave]
    alone = [stream(server.url, requests[i]) for i in stayed]
    assert [results[i] for i in stayed] == alone
    deadline = time.monotonic() + 10
    while server.metrics()["slimllm_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    m = server.metrics()
    assert m["slimllm_running"] == 0 and m["slimllm_queue_length"] == 0
    assert m['slimllm_requests_total{reason="cancelled"}'] >= len(leave)
