"""One attention layer's prefill, JAX backend: naive, slim and flash on the same K/V.

The paper's figure: 1024 tokens, 32 heads, d=128, FlashAttention 61.57 ms vs SlimAttention
16.02 ms on one Xeon 8563C socket. Only the attention call is timed: K/V are already in the
cache (written by the cache's own `write`, so int8 is quantised as generation quantises it),
projections are excluded. Jitted ahead of time, `block_until_ready`, median of interleaved runs.
Also the cache helpers kv_decode.py shares.

`python -m bench.attention [options]` (or `slimllm bench attention`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from slimllm.jaxbackend import kv_cache
from slimllm.jaxbackend.runtime import ATTENTION
from slimllm.reference.attention import attention_bias
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.positions import Positions

from .common import interleaved, log, r3, timing


def filled_cache(cfg: ModelConfig, b: int, length: int, kv_dtype: str, seed: int = 0):
    """A cache for `length` tokens whose every slot holds random K/V (as after a long prompt).
    Its length is the cache's own (whole key blocks); the slots past `length` are filled too."""
    cache = kv_cache.init_cache(cfg, b, length, kv_dtype)
    s = cache.max_len
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))  # [b,s]
    rng = np.random.default_rng(seed)
    for layer in range(cfg.n_layers):
        k, v = (rng.standard_normal((b, s, cfg.n_kv_heads, cfg.head_dim), np.float32) for _ in "kv")
        cache = kv_cache.write(cache, layer, jnp.asarray(k), jnp.asarray(v), slots)  # [b,s,k,d]
    return jax.block_until_ready(cache)


def layer_kv(cfg: ModelConfig, b: int, length: int, kv_dtype: str, seed: int = 0):
    """One filled cache layer, as attention reads it."""
    return kv_cache.read(filled_cache(cfg.replace(n_layers=1), b, length, kv_dtype, seed), 0)


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
        return ATTENTION[kind](q, kv_cache.LayerKV(*arrays, kv.fmt), bias, scale)

    t0 = time.perf_counter()
    program = jax.jit(attend).lower(q, arrays, bias).compile()
    compile_s = time.perf_counter() - t0
    out = program(q, arrays, bias).block_until_ready()  # one untimed run
    return compile_s, lambda: program(q, arrays, bias).block_until_ready(), out


def run(args) -> dict:
    """One attention layer's prefill: t queries at slots 0..t-1 over a filled cache of t slots
    (rounded up to whole key blocks as in generation; the causal mask hides the extra ones)."""
    b, t, h, kh, d = args.batch, args.tokens, args.heads, args.kv_heads, args.head_dim
    if h % kh:
        raise OptionError(f"--heads {h} is not a multiple of --kv-heads {kh}")
    shape = dict(n_heads=h, n_kv_heads=kh, head_dim=d, max_len=t)
    cfg = ModelConfig(vocab=1, width=h * d, n_layers=1, ffn_width=1, **shape)
    q = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, h, d), np.float32))
    kv = layer_kv(cfg, b, t, args.kv_dtype)  # [b,k,s,d]
    bias = causal_bias(cfg, b, 0, t, kv.length)  # [b,1,t,s]
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
