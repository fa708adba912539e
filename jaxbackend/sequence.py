"""Whole sequences through an Engine, for the accuracy harness and the diff toolkit.

`sequence_logits` teacher-forces one sequence (the prompt prefilled as generation would, the
rest in chunks; equal to token-by-token decode, since attention always reads the cache back) and
returns the logits at every position; `trace` runs one forward that also returns the named
intermediates of `model.TRACE_KEYS`. Both mirror what `slimllm.evaluate` and `slimllm.diff` do
with the reference's `forward` directly.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from slimllm.reference import positions as ref_positions
from slimllm.reference.model import tracing

from . import positions
from .engine import Engine, program_runtime
from .model import forward
from .runtime import Runtime
from .tp import SINGLE


def chunk_fn(params, tokens, cache, state, *, cfg, rt, comm=SINGLE):
    """Tokens [b,t] after state.lengths -> logits at every position [b,t,v], cache."""
    return forward(params, cfg, tokens, cache, state, rt, comm=comm)


def trace_fn(params, tokens, cache, state, *, cfg, rt, comm=SINGLE):
    """chunk_fn returning the named intermediates (model.TRACE_KEYS) instead of the logits: a
    separate program, traced inside `tracing()`, so the untraced ones are unchanged."""
    with tracing() as trace:
        _, cache = forward(params, cfg, tokens, cache, state, rt, comm=comm)
    return trace, cache


def sequence_logits(engine: Engine, tokens, bounds, rt: Runtime) -> np.ndarray:
    """Teacher-forced logits [n, v] of one sequence, forwarded in chunks ending at `bounds`
    (the first chunk is the prompt)."""
    cfg = engine.cfg
    state = positions.device_state(ref_positions.start_state(cfg, [tokens[: bounds[0]]]))
    cache = engine.new_cache(1, len(tokens), rt.kv_dtype)
    static = {"cfg": cfg, "rt": program_runtime(rt)}
    out, start = [], 0
    for end in bounds:
        chunk = jnp.asarray([tokens[start:end]], jnp.int32)
        logits, cache = engine.run(chunk_fn, static, (2,), engine.params, chunk, cache, state)
        out.append(engine.full_logits(logits[0]))
        state, start = positions.advance(state, end - start), end
    return np.concatenate(out)


def trace(engine: Engine, tokens, prompt_len: int, rt: Runtime) -> dict:
    """Named intermediates of one forward over `tokens` (prefix-LM / NTK facts from the first
    `prompt_len` tokens): name -> host array [t, ...]."""
    if engine.comm.per_process:
        raise ValueError("tracing runs in one process: use tp over devices, not mpiexec")
    cfg = engine.cfg
    state = positions.device_state(ref_positions.start_state(cfg, [tokens[:prompt_len]]))
    cache = engine.new_cache(1, len(tokens), rt.kv_dtype)
    static = {"cfg": cfg, "rt": program_runtime(rt)}
    chunk = jnp.asarray([tokens], jnp.int32)
    traced, _ = engine.run(trace_fn, static, (2,), engine.params, chunk, cache, state)
    out = {name: np.asarray(value[0]) for name, value in traced.items()}
    for name in out:  # report the model's own kv heads, not their tensor-parallel copies
        if name.rsplit(".", 1)[-1] in ("k", "v"):
            out[name] = out[name][:, :: engine.plan.kv_copies]
    return out
