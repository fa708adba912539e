"""Token channels (`src/channel.cc`): a decode loop compiled as one program hands each step's ids
to the host as they are chosen (`emit`), and the host asks rows to stop through the same
channel (`TokenChannel.stop`), so streaming needs no program dispatch per token.

`TokenChannel.open(rows)` returns None where the kernels are off or missing; the caller
(`jaxbackend/generate.stream`) then runs one program per token. A channel is named by a number
passed to the program as an operand, so the compiled program holds no pointer and the
persistent compilation cache can keep it.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _library, available, target


@functools.cache
def _functions():
    """The library with its channel functions' C signatures declared (once)."""
    lib = _library()[0]
    i64 = ctypes.c_int64
    lib.slimllm_channel_open.restype = i64
    lib.slimllm_channel_open.argtypes = [i64]
    lib.slimllm_channel_close.argtypes = [i64]
    lib.slimllm_channel_next.restype = ctypes.c_int
    lib.slimllm_channel_next.argtypes = [i64, ctypes.c_void_p, i64, i64]
    lib.slimllm_channel_stop.argtypes = [i64, i64]
    return lib


class TokenChannel:
    """The host's end of one channel for `rows` rows (close it when done: `with` does)."""

    def __init__(self, rows: int):
        self.lib = _functions()
        self.rows = rows
        self.number = self.lib.slimllm_channel_open(rows)
        self.buffer = np.zeros(rows, np.int32)

    @classmethod
    def open(cls, rows: int) -> TokenChannel | None:
        return cls(rows) if available() else None

    def operand(self):
        """The channel's number as the program's operand."""
        return jnp.asarray(self.number, jnp.int32)

    def next(self, timeout: float) -> np.ndarray | None:
        """The oldest step's ids [rows] not yet read, waiting up to `timeout` seconds (the GIL
        released), or None if none came."""
        got = self.lib.slimllm_channel_next(
            self.number, self.buffer.ctypes.data, self.rows, int(timeout * 1000)
        )
        if got < 0:
            raise RuntimeError(f"token channel {self.number} is closed or has other rows")
        return self.buffer.copy() if got else None

    def stop(self, row: int = -1) -> None:
        """Ask the loop to stop `row` (-1: every row) at its next step."""
        self.lib.slimllm_channel_stop(self.number, row)

    def close(self) -> None:
        """Forget the channel: a loop still running then stops every row at its next step."""
        if self.number:
            self.lib.slimllm_channel_close(self.number)
            self.number = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def emit(channel, ids):
    """Inside a program: hand ids [b] to the host through `channel` (an int32 scalar operand) ->
    the host's stop flags [b] (int32, 1: stop the row)."""
    call = jax.ffi.ffi_call(
        target("slimllm_emit"),
        jax.ShapeDtypeStruct(ids.shape, jnp.int32),
        has_side_effect=True,
    )
    return call(channel, ids.astype(jnp.int32))
