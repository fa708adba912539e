"""Beam search in JAX: the reference's `beam.py` (same settings, rules and results) on an
`Engine`, with compiled prefill, decode and cache reorder.

The model steps run compiled (`generate.prefill_fn`, `generate.decode_fn` at batch b x m); the
choice of the next ids is the reference's `step`, on the host, from the beams' full logits
(`Engine.full_logits`: the ranks' vocabulary slices gathered under tensor parallelism), so
both backends choose with the same code. Between steps `reorder_fn` gathers the donated cache
along its batch axis: row i of every layer's keys, values and int8 scales becomes its parent
beam's row. The batch axis is never split across ranks (heads are), so under tensor
parallelism each rank gathers its own heads' rows and no collective is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.reference.beam import (
    BeamConfig,
    check_beam_request,
    expand,
    results,
    start,
    step,
    tell,
)
from slimllm.reference.generate import GenerateResult, Stopping, check_request
from slimllm.reference.sampling import SamplingConfig

from .engine import Engine
from .generate import cache_length, decode, prefill
from .runtime import Runtime
from .tp import SINGLE


def reorder_fn(cache, rows, *, comm=SINGLE):
    """The cache whose row i is row rows[i] [n] of `cache`, in every layer (keys, values,
    scales): [b,k,s,d] -> [n,k,s,d], [b,k,s] -> [n,k,s]."""
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), cache)


def reorder(engine: Engine, cache, rows, donate: bool = True):
    """`reorder_fn` compiled; the old cache is donated unless its batch differs (the first copy
    of each prompt row to its beams)."""
    rows = jnp.asarray(rows, jnp.int32)
    return engine.run(reorder_fn, {}, (0,) if donate else (), cache, rows)


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    stopping: Stopping,
    beam: BeamConfig,
    sampling: SamplingConfig = SamplingConfig(),
    on_token: Callable[[int, int], None] | None = None,
    rt: Runtime = Runtime(),
) -> GenerateResult:
    """Beam search from each prompt, as the reference's `beam.generate`."""
    cfg = engine.cfg
    prompts, _, _ = check_request(cfg, prompts, stopping, 0, rt.cache_len)
    check_beam_request(stopping, sampling)
    b, m = len(prompts), beam.num_beams

    compile0 = engine.compile_seconds
    cache = engine.new_cache(
        b, cache_length(prompts, stopping.max_new_tokens, rt, cfg.max_len), rt.kv_dtype
    )
    t0 = time.perf_counter()
    logits, cache, state = prefill(engine, prompts, cache, rt)
    logits = engine.full_logits(logits)  # [b,v] on the host
    t1, compile1 = time.perf_counter(), engine.compile_seconds
    rows = np.repeat(np.arange(b), m)  # [b*m]: beam j of prompt row r is cache row r*m + j
    if m > 1:
        cache = reorder(engine, cache, rows, donate=False)
    state, logits = expand(state, jnp.asarray(rows)), logits[rows]
    beams = start(prompts, m, cfg.vocab)
    steps = 0
    for n in range(stopping.max_new_tokens):
        beams, parents, ids, ended = step(
            beams, logits, n, beam, stopping, sampling.repetition_penalty
        )
        if ended:
            break
        cache = reorder(engine, cache, parents)
        logits, cache, state = decode(engine, jnp.asarray(ids, jnp.int32), cache, state, rt)
        logits = engine.full_logits(logits)
        steps += 1
    out = results(beams, stopping)
    t2, compile2 = time.perf_counter(), engine.compile_seconds
    tell(out, on_token)
    return GenerateResult(
        out,
        t1 - t0 - (compile1 - compile0),
        t2 - t1 - (compile2 - compile1),
        steps,
        compile2 - compile0,
    )
