"""Malformed requests over raw HTTP: each a 4xx in OpenAI's error JSON, the server still
answering afterwards; and /metrics in the Prometheus text format, counting what was sent."""

# ruff: noqa: F811 - the fixtures imported from serving.py are parameters here
from __future__ import annotations

import re

import httpx
import pytest
from serving import model, model_dir, server  # noqa: F401 - fixtures

LONG = "Open the file " * 200  # far past the model's 256-token context
BAD = [  # (route, body, status, param or None)
    ("completions", b"{not json", 400, None),
    ("completions", b"\xff\xfe", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 400, "model"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("completions", {"prompt": "x", "top_k": 2.5}, 400, "top_k"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "x", "logprobs": True}, 400, None),
    ("completions", {"prompt": "x", "logprobs": 100}, 400, "logprobs"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [1, -2]}, 400, "prompt"),
    ("completions", {"prompt": [1, 99999]}, 400, None),
    ("completions", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("completions", {"prompt": LONG}, 400, "prompt"),
    ("completions", {"prompt": "x", "max_tokens": 100000}, 400, None),
    ("completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("completions", {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "king", "content": "x"}]}, 400, None),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, None),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        None,
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        400,
        "tools",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "functions": [{}]},
        400,
        "functions",
    ),
    (
        "chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
]


@pytest.mark.parametrize("route,body,status,param", BAD)
def test_a_bad_request_is_an_openai_error(server, route, body, status, param):
    url = f"{server.url}/v1/{route}"
    r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_routes_size_and_ignored_fields(server):
    assert httpx.get(server.url + "/v2/nothing").status_code == 404
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"{" + b" " * (5 * 2**20) + b"}")
    assert r.status_code == 413 and "error" in r.json()
    body = {"prompt": "x", "max_tokens": 2, "user": "me", "frobnicate": 1, "best_of": 1}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
SAMPLE = re.compile(rf"^{NAME}(\{{{LABEL}(,{LABEL})*\}})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf)$")
COMMENT = re.compile(rf"^# (HELP {NAME} .*|TYPE {NAME} (counter|gauge|histogram))$")


def test_metrics_parse_and_count_what_was_sent(server):
    text = httpx.get(server.url + "/metrics").text
    assert all(SAMPLE.match(line) or COMMENT.match(line) for line in text.splitlines()), text
    before = server.metrics()
    body = {"prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0, "n": 3}
    r = httpx.post(server.url + "/v1/completions", json=body).json()
    httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": 0})
    after = server.metrics()

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew("slimllm_generated_tokens_total") == r["usage"]["completion_tokens"] == 27
    assert grew("slimllm_prompt_tokens_total") == 9  # each choice's prompt
    assert grew('slimllm_requests_total{reason="length"}') == 3
    assert grew('slimllm_errors_total{status="400"}') == 1
    assert grew("slimllm_time_to_first_token_seconds_count") == 3
    assert grew("slimllm_inter_token_latency_seconds_count") == 3 * 8
    assert (
        after['slimllm_time_to_first_token_seconds_bucket{le="+Inf"}']
        == after["slimllm_time_to_first_token_seconds_count"]
    )
    assert after["slimllm_running"] == 0 and after["slimllm_max_batch"] == 4
    assert after["slimllm_tokens_per_second"] > 0
    assert after["slimllm_prefix_cache_lookups_total"] >= 3
    assert 0 <= after["slimllm_prefix_cache_hit_rate"] <= 1
