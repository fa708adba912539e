"""Streaming through a token channel (`kernels/channel.py`, `generate.channel_stream`) against
streaming one program per token (`generate.stream`'s own loop), on ragged batches of stories260K.

The channel's loop program hands each step's ids to the host and stops the rows the host asks it
to stop; the host records what it gets exactly as the per-token loop does. So both give the same
ids, finish reasons and `on_token` calls, on every stopping rule: the device's own (length, EOS
ids, stop sequences) and the host's alone (stop strings, which the loop learns of a step or more
late and must still end early). A callback that raises ends the generation with its error and
leaves the loop stopping; the channel itself answers "stop" for every row once closed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_paths import needs_library
from slimllm.jaxbackend import generate as jax_generate
from slimllm.jaxbackend.engine import Engine
from slimllm.kernels import channel as token_channel
from slimllm.reference.generate import Stopping
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import SamplingConfig

pytestmark = needs_library

MAX_NEW = 24
BUDGET = 200  # new tokens of the runs that should end long before it
RT = Runtime(cache_len=256)
SAMPLED = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)


def decode(ids):
    return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def setup(stories):
    model, oracle = stories
    prompt_b = oracle["prompt_b"].tolist()
    rows = [oracle["prompt_a"].tolist(), prompt_b[:7], prompt_b[:16]]
    return model.engine(RT), rows


def run(engine, rows, stopping, sampling=SamplingConfig(), channel=True, *, monkeypatch):
    """(ids, finish reasons, on_token calls, the loop program's step count or None); without
    `channel`, the same stream one program a token (`monkeypatch` undoes both spies)."""
    calls, programs = [], []
    if not channel:
        monkeypatch.setattr(token_channel.TokenChannel, "open", classmethod(lambda cls, b: None))
    real_run = Engine.run

    def spy(self, fn, static, donate, *args):
        out = real_run(self, fn, static, donate, *args)
        programs.append((fn.__name__, out))
        return out

    monkeypatch.setattr(Engine, "run", spy)
    result = jax_generate.generate(
        engine,
        rows,
        stopping,
        sampling,
        seeds=[3, 4, 5],
        on_token=lambda r, t: calls.append((r, t)),
        rt=RT,
        mode="stream",
    )
    monkeypatch.undo()
    loops = [int(out[2]) for name, out in programs if name == "channel_loop_fn"]
    assert len(loops) == (1 if channel else 0), [name for name, _ in programs]
    ids = [row.ids for row in result.rows]
    return ids, [row.finish_reason for row in result.rows], calls, (loops or [None])[0]


def stopping_cases(free):
    eos = free[0][MAX_NEW // 3]
    stop = tuple(free[2][MAX_NEW // 2 : MAX_NEW // 2 + 2])
    text = decode(free[1][: MAX_NEW // 4 + 1]).split()[-1]  # row 1 makes it a quarter way in
    return {
        "length": Stopping(MAX_NEW),
        "eos+stop": Stopping(MAX_NEW, eos_ids=(eos,), stop_sequences=(stop,)),
        "stop string": Stopping(MAX_NEW, stop_strings=(text,), decode=decode),
    }


@pytest.mark.parametrize("sampling", [SamplingConfig(), SAMPLED], ids=["greedy", "sampled"])
def test_the_channel_streams_what_one_program_per_token_streams(setup, sampling, monkeypatch):
    engine, rows = setup
    free = run(engine, rows, Stopping(MAX_NEW), sampling, channel=False, monkeypatch=monkeypatch)
    reasons = set()
    for name, stopping in stopping_cases(free[0]).items():
        want = run(engine, rows, stopping, sampling, channel=False, monkeypatch=monkeypatch)
        got = run(engine, rows, stopping, sampling, channel=True, monkeypatch=monkeypatch)
        assert got[:3] == want[:3], name
        reasons |= set(want[1])
        longest = max(len(ids) for ids in want[0])
        if stopping.stop_strings:  # the loop learns of the host's stops late, never early
            assert got[3] >= longest, (name, got[3], longest)
        else:  # the loop stops rows by the same rules as the host, at the same step
            assert got[3] == longest, (name, got[3], longest)
    assert reasons >= {"length", "eos", "stop"}, reasons


def test_a_host_stop_ends_the_loop_early(setup, monkeypatch):
    """Every row stops at its first token on a stop string: the host records one token a row and
    the loop, which learns of it a step or a few late (it never waits for the host), ends long
    before its budget (stories260K decodes a step in well under a millisecond here)."""
    engine, rows = setup  # the loop ran 2-43 steps of 200 (idle 2-core machine, 5 runs)
    stopping = Stopping(BUDGET, stop_strings=("t",), decode=decode)
    ids, reasons, calls, steps = run(engine, rows, stopping, monkeypatch=monkeypatch)
    assert reasons == ["stop"] * 3 and [len(row) for row in ids] == [1, 1, 1]
    assert len(calls) == 3 and 1 <= steps < BUDGET


def test_a_raising_callback_ends_the_generation(setup):
    engine, rows = setup

    def on_token(row, token):
        if row == 2:
            raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        jax_generate.generate(
            engine, rows, Stopping(BUDGET), on_token=on_token, rt=RT, mode="stream"
        )
    again = jax_generate.generate(engine, rows, Stopping(4), rt=RT, mode="stream")
    assert [len(row.ids) for row in again.rows] == [4, 4, 4]


def test_the_channel_hands_over_ids_and_stop_flags():
    emit = jax.jit(token_channel.emit)
    ids = jnp.asarray([7, 8, 9], jnp.int32)
    with token_channel.TokenChannel(3) as channel:
        assert channel.next(0) is None
        assert np.asarray(emit(channel.operand(), ids)).tolist() == [0, 0, 0]
        channel.stop(1)
        assert np.asarray(emit(channel.operand(), ids + 1)).tolist() == [0, 1, 0]
        assert channel.next(1).tolist() == [7, 8, 9]
        assert channel.next(1).tolist() == [8, 9, 10]
        assert channel.next(0) is None
        number = channel.operand()
    assert np.asarray(emit(number, ids)).tolist() == [1, 1, 1]  # closed: every row stops


def test_a_loop_stops_the_rows_the_host_stopped():
    """A loop that runs until every row is done (or 100 steps), its rows' only stop the host's:
    rows stopped before it starts end it at its first step, once the channel is closed too."""

    @jax.jit
    def loop(number):
        def body(carry):
            n, done = carry
            return n + 1, done | (token_channel.emit(number, jnp.full(3, n)) > 0)

        return jax.lax.while_loop(
            lambda c: (c[0] < 100) & ~jnp.all(c[1]), body, (jnp.int32(0), jnp.zeros(3, bool))
        )[0]

    with token_channel.TokenChannel(3) as channel:
        channel.stop(0)
        channel.stop(2)
        assert int(loop(channel.operand())) == 100  # row 1 runs on
        channel.stop(1)
        assert int(loop(channel.operand())) == 1
        number = channel.operand()
    assert int(loop(number)) == 1
