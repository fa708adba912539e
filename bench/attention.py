"""One attention layer's prefill, JAX backend: naive, slim and flash on the same K/V.

The paper's figure: 1024 tokens, 32 heads, d=128, FlashAttention 61.57 ms vs SlimAttention
16.02 ms on one Xeon 8563C socket. Only the attention call is timed: K/V are already in the
cache (int8 quantised as the cache does), projections are excluded. Jitted ahead of time,
`block_until_ready`, median of interleaved runs. Also the cache helpers kv_decode.py shares.

`python -m bench.attention [options]` (or `slimllm bench attention`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.jaxbackend.kv_cache import STORAGE, KVCache, LayerKV, padded_len
from slimllm.jaxbackend.model import ATTENTION
from slimllm.reference.attention import attention_bias
from slimllm.reference.config import ModelConfig
from slimllm.reference.positions import Positions
from slimllm.reference.quant import quantize

from .common import interleaved, log, r3, timing


def random_layer_kv(b: int, kh: int, s: int, d: int, kv_dtype: str, seed: int = 0):
    """A filled cache layer of s slots: random K/V stored in kv_dtype (drawn and quantised in
    NumPy, bit-identical to the JAX encoding, so no eager JAX ops need compiling)."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(2):  # K, then V
        x = rng.standard_normal((b, kh, s, d), np.float32)  # [b,k,s,d]
        stored, scale = quantize(x) if kv_dtype == "int8" else (x.astype(STORAGE[kv_dtype]), None)
        parts += [jnp.asarray(stored), None if scale is None else jnp.asarray(scale)]
    k, k_scale, v, v_scale = parts
    return LayerKV(k, v, k_scale, v_scale, kv_dtype)


def filled_cache(cfg: ModelConfig, b: int, context: int, kv_dtype: str):
    """A cache of `context` slots whose every slot holds random K/V (as after a long prompt)."""
    if padded_len(context) != context:
        raise ValueError(f"--context {context} must be a multiple of 64 (256 above 256)")
    layers = [
        random_layer_kv(b, cfg.n_kv_heads, context, cfg.head_dim, kv_dtype, seed=i)
        for i in range(cfg.n_layers)
    ]
    scales = kv_dtype == "int8"
    cache = KVCache(
        tuple(x.k for x in layers),
        tuple(x.v for x in layers),
        tuple(x.k_scale for x in layers) if scales else None,
        tuple(x.v_scale for x in layers) if scales else None,
        kv_dtype,
    )
    jax.block_until_ready(cache)
    return cache


def causal_bias(cfg: ModelConfig, b: int, start: int, t: int, s: int):
    """Bias [b,1,t,s] of t queries at slots start.. over s key slots (as the model builds it)."""
    slots = np.broadcast_to(start + np.arange(t)[None, :], (b, t))  # [b,t]
    pos = Positions(slots, slots, np.zeros(b, np.int64), np.ones(b, np.float32))
    return jnp.asarray(attention_bias(cfg, pos, s), jnp.float32)


def compiled_attention(kind: str, q, kv, bias):
    """One attention call jitted ahead of time -> (compile seconds, call, output)."""
    scale = q.shape[-1] ** -0.5
    arrays = (kv.k, kv.v, kv.k_scale, kv.v_scale)  # LayerKV is not a pytree: pass its arrays

    def attend(q, arrays, bias):
        return ATTENTION[kind](q, LayerKV(*arrays, kv.dtype), bias, scale)

    t0 = time.perf_counter()
    program = jax.jit(attend).lower(q, arrays, bias).compile()
    compile_s = time.perf_counter() - t0
    out = program(q, arrays, bias).block_until_ready()  # one untimed run
    return compile_s, lambda: program(q, arrays, bias).block_until_ready(), out


def run(args) -> dict:
    """One attention layer's prefill: t queries at slots 0..t-1 over a filled cache of t slots."""
    b, t, h, kh, d = args.batch, args.tokens, args.heads, args.kv_heads, args.head_dim
    if h % kh:
        raise ValueError(f"--heads {h} is not a multiple of --kv-heads {kh}")
    shape = dict(n_heads=h, n_kv_heads=kh, head_dim=d, max_len=t)
    cfg = ModelConfig(vocab=1, width=h * d, n_layers=1, ffn_width=1, **shape)
    q = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, h, d), np.float32))
    kv = random_layer_kv(b, kh, t, d, args.kv_dtype)  # [b,k,s,d]
    bias = causal_bias(cfg, b, 0, t, t)  # [b,1,t,s]
    flops = 4 * b * h * d * t * (t + 1) // 2  # QK^T and PV over the visible (causal) half
    compiled, calls, outputs = {}, {}, {}
    for kind in args.kinds:
        log(f"attention prefill, {kind}: b={b} t={t} h={h} k={kh} d={d} {args.kv_dtype}")
        compiled[kind], calls[kind], outputs[kind] = compiled_attention(kind, q, kv, bias)
    log(f"attention prefill: {args.runs} interleaved runs")
    kinds = {}
    for kind, ms in interleaved(calls, args.runs).items():
        kinds[kind] = timing(compiled[kind], ms) | {"gflops": r3(flops / np.median(ms) / 1e6)}
        if "naive" in outputs:
            diff = jnp.abs(outputs[kind] - outputs["naive"]).max()
            kinds[kind]["max_abs_diff_vs_naive"] = float(diff)
    report = {
        "kind": "attention",
        "what": "one attention layer's prefill (attention call only: K/V already in the cache, "
        "projections excluded), jitted, median of interleaved runs",
        "shape": {"batch": b, "tokens": t, "heads": h, "kv_heads": kh, "head_dim": d},
        "kv_dtype": args.kv_dtype,
        "runs": args.runs,
        "causal_gflop": r3(flops / 1e9),
        "kinds": kinds,
    }
    if "slim" in kinds and "flash" in kinds:
        report["slim_over_flash"] = r3(kinds["slim"]["median_ms"] / kinds["flash"]["median_ms"])
    if "slim" in kinds and "naive" in kinds:
        report["slim_over_naive"] = r3(kinds["slim"]["median_ms"] / kinds["naive"]["median_ms"])
    return report


def summary(r: dict) -> str:
    sh = r["shape"]
    lines = [
        f"attention prefill: b={sh['batch']} t={sh['tokens']} h={sh['heads']} "
        f"k={sh['kv_heads']} d={sh['head_dim']} ({r['kv_dtype']}), median of {r['runs']}"
    ]
    for kind, k in r["kinds"].items():
        lines.append(
            f"  {kind:6s} {k['median_ms']:9.2f} ms {k['gflops']:7.1f} GFLOP/s "
            f"(compile {k['compile_seconds']} s)"
        )
    if "slim_over_flash" in r:
        lines.append(f"  slim / flash = {r['slim_over_flash']}")
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["attention", *sys.argv[1:]]))
