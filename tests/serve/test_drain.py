"""SIGTERM while streaming: new requests get 503, the streams in flight end with a final chunk
and [DONE] (cut at --drain-timeout if they run longer), and the process exits with status 0.
The same server (its model without a chat template) answers chat with a clear 400, and a full
queue with 429 and Retry-After."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from serving import Server, model_copy


def test_sigterm_drains_streams_and_exits_zero(tmp_path):
    server = Server(
        model_copy(tmp_path / "plain", template=None),
        *("--max-batch", "2", "--max-queue", "8", "--drain-timeout", "2"),
    )
    try:
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(server.url + "/v1/chat/completions", json=chat)
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"

        results, answered = [None] * 16, threading.Semaphore(0)

        def client(i):
            body = {"prompt": f"Open the file {i}", "max_tokens": 240, "stream": True}
            body |= {"stream_options": {"include_usage": True}, "temperature": 0.5, "seed": i}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                answered.release()
                if r.status_code != 200:
                    results[i] = (r.status_code, r.headers.get("retry-after"), json.loads(r.read()))
                    return
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                results[i] = (200, lines)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for _ in threads:  # every request answered (streaming or refused): then the signal
            assert answered.acquire(timeout=60)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 503
        for t in threads:
            t.join(timeout=60)
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop(signal.SIGKILL)

    refused = [r for r in results if r[0] != 200]
    served = [r[1] for r in results if r[0] == 200]
    assert refused and all(status == 429 and retry for status, retry, _ in refused)
    assert len(served) >= 9  # the 8 queued and at least one running
    cut = 0
    for lines in served:
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][6:])["usage"]
        final = json.loads(lines[-3][6:])["choices"][0]
        assert final["finish_reason"] in ("length", "stop")
        cut += usage["completion_tokens"] < 240 and final["finish_reason"] == "length"
    assert cut >= 1  # 2 seconds do not finish 10 x 240 tokens on two slots
