"""Helpers of the serve tests: `slimllm serve` in a child process, a model copy to serve.

One server per test session, on a copy of the shipped model (tiny: its context is 256 tokens)
given a simple chat template, on a free port (--port 0, read back from its start line). Its
outputs are compared with `slimllm.generate` in this process: the scheduler promises each
request the tokens it would get alone.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

import slimllm

# A ChatML-like template, with BOS at the start: the server must not add a second one.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def model_copy(directory, template: str | None = TEMPLATE):
    """The shipped model copied to `directory`, with `template` in its tokenizer_config."""
    shutil.copytree(slimllm.SHIPPED_MODEL, directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if template is not None:
        config["chat_template"] = template
    path.write_text(json.dumps(config))
    return directory


class Server:
    """A `slimllm serve` child process and its base URL."""

    def __init__(self, model_dir, *options, timeout: float = 240.0):
        argv = [sys.executable, "-m", "slimllm.cli", "serve", "--model", str(model_dir)]
        argv += ["--port", "0", "--model-name", "tiny", *options]
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.log: list[str] = []
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:  # the start line: "slimllm: serving NAME on http://HOST:PORT"
            line = self.proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.log))
            self.log.append(line)
            if line.startswith("slimllm: serving "):
                self.url = line.split(" on ")[-1].strip()
        assert httpx.get(self.url + "/health").json() == {"status": "ok"}

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples: 'name{labels}' -> value."""
        text = httpx.get(self.url + "/metrics").text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples


# The fixtures, imported by the test modules (a conftest.py here would shadow tests/conftest.py,
# which other tests import as `conftest`). One server and one model per session, kept here.
_shared: dict = {}


def shared(key, make):
    if key not in _shared:
        _shared[key] = make()
    return _shared[key]


@pytest.fixture
def model_dir(tmp_path_factory):
    return shared("dir", lambda: model_copy(tmp_path_factory.mktemp("serve") / "tiny"))


@pytest.fixture
def server(model_dir):
    def start():
        s = Server(model_dir, "--max-batch", "4")
        atexit.register(s.stop)  # at the end of the session
        return s

    return shared("server", start)


@pytest.fixture
def model(model_dir):
    return shared("model", lambda: slimllm.load(model_dir))
