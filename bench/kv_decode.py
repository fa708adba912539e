"""One decode step at a long context per KV cache dtype (default context 4096, batch 4), JAX
backend: float32 against int8, whose cache is a quarter of the bytes to read.

For each dtype a cache of `context` slots is filled with random K/V (written by the cache
itself, so int8 is quantised as generation quantises it), then (a) `model_step`: one jitted
decode step of the whole model at slot `context - 1` (embedding, every layer's cache write and
attention over `context` keys, LM head; the cache donated and reused), and (b)
`attention_layer`: the attention call of one layer alone. Medians of interleaved runs; the
floor adds the KV bytes to the weight bytes (decode.py) over the read bandwidth. Then (c)
`prefill`: in a fresh process per dtype, a generation that fills the `context` slots of one row
(a `context - 1` token prompt and one new token), twice: the second's prefill time and the
process's peak resident memory (an int8 cache must never cost more than a float32 one).

`python -m bench.kv_decode [options]` (or `slimllm bench kv-decode`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.jaxbackend.generate import decode_fn
from slimllm.jaxbackend.kv_cache import padded_len
from slimllm.jaxbackend.positions import SeqState
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.runtime import Runtime

from .attention import causal_bias, compiled_attention, filled_cache, layer_kv
from .bandwidth import combine_bandwidth, measure_bandwidth
from .common import build_model, bytes_read_per_token, interleaved, kv_bytes_read, log, r3, timing
from .realsize import own_peak_rss_bytes

PARTS = ("model_step", "attention_layer")


def compiled_step(params, cfg: ModelConfig, b: int, context: int, rt: Runtime):
    """The whole model's decode step at slot context-1, jitted like the engine's with the cache
    donated -> (compile seconds, call that runs one step and keeps the returned cache)."""
    cache = filled_cache(cfg, b, context, rt.kv_dtype)
    zeros = jnp.zeros(b, jnp.int32)
    state = SeqState(jnp.full(b, context - 1, jnp.int32), zeros, zeros, jnp.ones(b, jnp.float32))
    ids = jnp.ones(b, jnp.int32)
    fn = functools.partial(decode_fn, cfg=cfg, rt=rt)
    t0 = time.perf_counter()
    program = jax.jit(fn, donate_argnums=(2,)).lower(params, ids, cache, state).compile()
    compile_s = time.perf_counter() - t0
    box = [cache]

    def step():
        logits, box[0] = program(params, ids, box[0], state)
        logits.block_until_ready()

    step()  # one untimed run
    return compile_s, step


def prefill_child(spec: dict) -> dict:
    """In the child: generate twice from a `tokens`-long prompt with this KV dtype."""
    from slimllm.api import generate  # here: the parent never generates

    model, _ = build_model(argparse.Namespace(**spec["model_args"]))
    built = own_peak_rss_bytes()
    prompt = np.random.default_rng(0).integers(0, model.cfg.vocab, spec["tokens"]).tolist()
    options = dict(ids=prompt, max_new_tokens=1, attention=spec["attention"], eos_ids=())
    for _ in range(2):  # the first compiles
        out = generate(model, kv_dtype=spec["kv_dtype"], **options)
    return {
        "tokens": spec["tokens"],
        "prefill_ms": r3(out.prefill_seconds * 1e3),
        "peak_rss_after_build_bytes": built,
        "peak_rss_bytes": own_peak_rss_bytes(),
    }


def prefill_run(args, kv_dtype: str) -> dict:
    """`prefill_child` in a fresh process, so that the peak memory is the prefill's own."""
    names = ("model", "preset", "config", "layers")
    spec = {
        "model_args": {name: getattr(args, name) for name in names},
        "tokens": args.context - 1,
        "attention": args.attention,
        "kv_dtype": kv_dtype,
    }
    cmd = [sys.executable, "-m", "slimllm.bench.kv_decode", "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip()[-2000:], "returncode": done.returncode}
    return json.loads(done.stdout)


def run(args, bandwidth: dict | None = None) -> dict:
    """Decode at a long context per KV dtype: the whole model step and the attention layer."""
    if bandwidth is None and args.bandwidth_mib > 0:
        bandwidth = combine_bandwidth([measure_bandwidth(args.bandwidth_mib, "before")])
    model, info = build_model(args)
    cfg = model.cfg
    b, ctx = args.kv_batch, args.context
    if ctx > cfg.max_len:
        raise OptionError(f"--context {ctx} exceeds the model's context {cfg.max_len}")
    if padded_len(ctx) != ctx:  # the step reads exactly `context` keys
        raise OptionError(f"--context {ctx} must be a multiple of 64 (256 above 256)")
    engine = model.engine()
    weight_bytes = bytes_read_per_token(model.params, cfg, b)
    model.params = None
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, 1, cfg.n_heads, cfg.head_dim), np.float32))
    bias = causal_bias(cfg, b, ctx - 1, 1, ctx)  # [b,1,1,s]
    compiled, calls = {}, {}
    for dtype in args.kv_dtypes:
        log(f"decode step at context {ctx}, batch {b}, {dtype} cache, {args.attention}")
        rt = Runtime(attention=args.attention, kv_dtype=dtype)
        step_s, calls[("model_step", dtype)] = compiled_step(engine.params, cfg, b, ctx, rt)
        kv = layer_kv(cfg, b, ctx, dtype)
        attention = compiled_attention(args.attention, q, kv, bias)
        layer_s, calls[("attention_layer", dtype)] = attention[:2]
        compiled |= {("model_step", dtype): step_s, ("attention_layer", dtype): layer_s}
    log(f"kv-decode: {args.runs} interleaved runs")
    ms = interleaved(calls, args.runs)
    dtypes = {}
    for dtype in args.kv_dtypes:
        row = {part: timing(compiled[(part, dtype)], ms[(part, dtype)]) for part in PARTS}
        row["kv_bytes_per_step"] = kv_bytes = kv_bytes_read(cfg, b, ctx, dtype)
        if bandwidth:
            row["floor_ms"] = r3((weight_bytes + kv_bytes) / bandwidth["read_gbs"] / 1e6)
            row["model_step_vs_floor"] = r3(row["model_step"]["median_ms"] / row["floor_ms"])
        log(f"prefill of {ctx - 1} tokens, {dtype} cache, in a child process")
        row["prefill"] = prefill_run(args, dtype)
        dtypes[dtype] = row
    report = {
        "kind": "kv-decode",
        "what": "model_step: one jitted decode step of the whole model (embedding, every layer's "
        "cache write and attention over `context` keys, LM head), cache donated; "
        "attention_layer: the attention call of one layer alone; medians of interleaved runs",
        "model": info,
        "batch": b,
        "context": ctx,
        "attention": args.attention,
        "runs": args.runs,
        "weight_bytes_per_step": weight_bytes,
        "bandwidth": bandwidth,
        "dtypes": dtypes,
    }
    base, *others = args.kv_dtypes  # every format against the first listed (float32 default)
    for name in others:
        for part in PARTS:
            ratio = dtypes[name][part]["median_ms"] / dtypes[base][part]["median_ms"]
            report[f"{name}_over_{base}_{part}"] = r3(ratio)
        mine, theirs = dtypes[name]["prefill"], dtypes[base]["prefill"]
        for key in ("prefill_ms", "peak_rss_bytes"):
            if key in mine and key in theirs:
                report[f"{name}_over_{base}_{key}"] = r3(mine[key] / theirs[key])
    return report


def summary(r: dict) -> str:
    lines = [
        f"kv-decode: batch {r['batch']}, context {r['context']}, {r['attention']} attention, "
        f"{r['model']['source']}",
        f"  {'dtype':9s} {'model step ms':>14s} {'attention ms':>13s} {'KV MB':>8s} "
        f"{'x floor':>8s}",
    ]
    for dtype, d in r["dtypes"].items():
        step, layer = d["model_step"]["median_ms"], d["attention_layer"]["median_ms"]
        lines.append(
            f"  {dtype:9s} {step:14.2f} {layer:13.3f} {d['kv_bytes_per_step'] / 1e6:8.1f} "
            f"{d.get('model_step_vs_floor')!s:>8}"
        )
    lines.append(f"  {'dtype':9s} {'prefill ms':>14s} {'peak RSS MiB':>13s}  (prefill tokens)")
    for dtype, d in r["dtypes"].items():
        p = d["prefill"]
        if "error" in p:
            lines.append(f"  {dtype:9s} failed: {p['error'].splitlines()[-1][:80]}")
            continue
        lines.append(
            f"  {dtype:9s} {p['prefill_ms']:14.1f} {p['peak_rss_bytes'] / 2**20:13,.0f}"
            f"  ({p['tokens']})"
        )
    if "int8_over_float32_model_step" in r:
        lines.append(
            f"  int8 / float32: model step {r['int8_over_float32_model_step']}, "
            f"attention {r['int8_over_float32_attention_layer']}, "
            f"prefill {r.get('int8_over_float32_prefill_ms')}, "
            f"peak RSS {r.get('int8_over_float32_peak_rss_bytes')}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(prefill_child(json.loads(sys.argv[2]))))
        sys.exit(0)
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["kv-decode", *sys.argv[1:]]))
