"""The wire-format helpers of `slimllm serve` (slimllm/serve_protocol.py) on their own, and
its command line's mistakes."""

from __future__ import annotations

import socket

from slimllm.cli import main
from slimllm.serve_protocol import TextStream

PIECES = ["Hel", "lo", " wor", "ld", ".", " Next"]


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_text_is_held_back_while_it_could_begin_a_stop_string():
    s = TextStream(decode, ("world.",))
    shown = [s.push(i)[0] for i in range(5)]
    assert shown == ["Hel", "lo", " ", "", ""]  # "wor", "world" might begin "world."
    text, tokens = s.finish()
    assert s.text == "Hello " and text == ""
    assert [t.id for t in s.tokens] == [0, 1, 2]  # " wor" starts before the cut: kept


def test_without_a_stop_every_token_is_released_with_its_offsets():
    s = TextStream(decode, ())
    assert "".join(s.push(i, -0.5)[0] for i in range(6)) + s.finish()[0] == decode(range(6))
    assert [t.start for t in s.tokens] == [0, 3, 5, 9, 11, 12]
    assert all(t.logprob == -0.5 for t in s.tokens)


def test_a_missing_serve_extra_is_one_line(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "slimllm.server", None)  # as if starlette were missing
    assert main(["serve", "--port", "0"]) == 2
    assert "pip install 'slimllm[serve]'" in capsys.readouterr().err


def test_an_address_in_use_is_one_line_before_the_model_loads(capsys):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    argv = ["serve", "--model", "/no/such/model", "--port", str(port)]
    with taken:
        assert main(argv) == 2  # the address fails first: the missing model is never read
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slimllm: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err
    assert main(["serve", "--host", "no.such.host.invalid", "--port", "0"]) == 2
    assert "cannot listen on no.such.host.invalid" in capsys.readouterr().err
