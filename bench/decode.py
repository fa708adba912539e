"""Decode latency the way xFasterTransformer measures it (PAPER.md section 8).

A fixed prompt of N tokens for each of B rows, greedy, `warmup` untimed runs then `iterations`
timed ones. First-token latency is the time from the call to the first chosen token (cache
allocation, prefill, first sample); next-token latency is the time between consecutive tokens
(mean and p90 over every step of every iteration); throughput without the first token is
`1000 / next_ms * B`. Timestamps come from the public `slimllm.generate` streaming callback, so
both backends are timed on the path users run. The floor is the weight (and KV) bytes a step
reads over the read bandwidth measured in the same run (bandwidth.py). Peak memory is the
process's `ru_maxrss` and JAX's live device buffers.

`python -m bench.decode [options]` (or `slimllm bench decode`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from slimllm.api import generate
from slimllm.reference.config import ModelConfig
from slimllm.reference.runtime import Runtime

from .bandwidth import combine_bandwidth, measure_bandwidth
from .common import build_model, bytes_read_per_token, kv_bytes_read, log, peak_rss_bytes, r3, stats

# The run settings reported back: decode shape, runtime settings, repetitions.
SETTINGS = (
    "batch",
    "prompt_len",
    "new_tokens",
    "kv_dtype",
    "attention",
    "iterations",
    "warmup",
    "mode",
)


def live_device_bytes() -> int:
    return int(sum(a.nbytes for a in jax.live_arrays()))


def decode_once(model, backend: str, prompts, args, probe: bool = False) -> dict:
    """One generation; first-token and per-token latencies in ms (and, when probing, the live
    device bytes at the first token: weights, cache and activations)."""
    stamps, live = [], []

    def on_token(row, token):
        if row == 0:
            stamps.append(time.perf_counter())
            if probe and len(stamps) == 1:
                live.append(live_device_bytes())

    t0 = time.perf_counter()
    out = generate(
        model,
        ids=prompts,
        max_new_tokens=args.new_tokens,
        eos_ids=(),
        on_token=on_token,
        backend=backend,
        attention=args.attention,
        kv_dtype=args.kv_dtype,
        tp=args.tp if backend == "jax" else 1,
    )
    stamps = np.asarray(stamps)  # the probe runs after the first stamp, in an untimed run
    return {
        "first_ms": (stamps[0] - t0) * 1e3,
        "next_ms": list(np.diff(stamps) * 1e3),
        "prefill_ms": out.prefill_seconds * 1e3,
        "compile_seconds": out.compile_seconds,
        "device_bytes": live[0] if live else None,
    }


def decode_loop_once(model, prompts, args, probe: bool = False) -> dict:
    """One generation as a single compiled loop (no host per token): only the mean step time."""
    out = generate(
        model,
        ids=prompts,
        max_new_tokens=args.new_tokens,
        eos_ids=(),
        backend="jax",
        attention=args.attention,
        kv_dtype=args.kv_dtype,
        mode="loop",
        tp=args.tp,
    )
    steps = max(out.decode_steps, 1)
    return {
        "first_ms": out.prefill_seconds * 1e3,
        "next_ms": [out.decode_seconds * 1e3 / steps],
        "prefill_ms": out.prefill_seconds * 1e3,
        "compile_seconds": out.compile_seconds,
        "device_bytes": live_device_bytes() if probe else None,
    }


def backend_report(model, backend: str, warm: list, runs: list, args) -> dict:
    """xFT's fields for one backend from its warm-up and timed runs."""
    loop = backend == "jax" and args.mode == "loop"
    next_stats = stats([t for r in runs for t in r["next_ms"]])
    if loop:  # one mean per run: percentiles over steps are not observable inside one program
        next_stats |= {"p50": None, "p90": None, "n": len(runs) * (args.new_tokens - 1)}
    mean = next_stats["mean"]
    report = {
        "mode": "loop" if loop else "stream",
        "first_token_ms": stats([r["first_ms"] for r in runs]),
        "prefill_ms": stats([r["prefill_ms"] for r in runs]),
        "next_token_ms": next_stats,
        "throughput_tokens_per_s": r3(1000 / mean * args.batch) if mean else None,
        "compile_seconds": r3(sum(r["compile_seconds"] for r in warm)),  # numpy: 0
        "compile_seconds_while_timed": r3(sum(r["compile_seconds"] for r in runs)),
        "device_bytes": warm[0]["device_bytes"] if warm else None,
    }
    if backend == "jax":
        programs = {}  # compile seconds per program (summed over shapes)
        for key, c in getattr(model.engine(Runtime(tp=args.tp)), "programs", {}).items():
            programs[key[0]] = r3(programs.get(key[0], 0.0) + c.seconds)
        report["programs"] = programs
    return report


def communication(cfg: ModelConfig, batch: int, tp: int) -> dict:
    """Collectives of one greedy decode step and the bytes each rank sends, from the shapes the
    HLO tests count: per layer two all-reduces of the [b, 1, e] float32 hidden state, then the
    LM head's (value, id) max and min reductions of b values. A ring all-reduce of M bytes over
    R ranks sends 2 (R - 1) / R * M bytes per rank."""
    if tp <= 1:
        return {"collectives_per_step": 0, "bytes_sent_per_rank_per_step": 0}
    ring = 2 * (tp - 1) / tp
    hidden = batch * cfg.width * 4
    per_step = 2 * cfg.n_layers * hidden + 2 * batch * 4
    return {
        "collectives_per_step": 2 * cfg.n_layers + 2,
        "allreduce_bytes_per_step": per_step,
        "bytes_sent_per_rank_per_step": int(ring * per_step),
        "full_logits_bytes_avoided": batch * cfg.vocab * 4,
    }


def floor(weight_bytes: int, kv_bytes: int, context: int, bandwidth: dict | None) -> dict:
    """The bandwidth floor of one step: its bytes over the read bandwidth (None unmeasured)."""
    gbs = bandwidth["read_gbs"] if bandwidth else None
    return {
        "weight_bytes_per_token": weight_bytes,
        "kv_bytes_per_token": kv_bytes,
        "mean_context": context,
        "ms": r3(weight_bytes / gbs / 1e6) if gbs else None,
        "ms_with_kv": r3((weight_bytes + kv_bytes) / gbs / 1e6) if gbs else None,
    }


def run(args, bandwidth: dict | None = None) -> dict:
    """xFT's decode benchmark for one model on one or both backends (interleaved, so that load
    from other processes falls on both alike)."""
    model, info = build_model(args)
    cfg = model.cfg
    if args.batch < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        raise ValueError("need --batch >= 1, --prompt-len >= 1 and --new-tokens >= 2")
    if args.prompt_len + args.new_tokens > cfg.max_len:
        raise ValueError(f"--prompt-len + --new-tokens exceeds the model's context {cfg.max_len}")
    backends = ["jax", "numpy"] if args.compare else [args.backend]
    samples = [bandwidth] if bandwidth else []
    if not samples and args.bandwidth_mib > 0:
        samples.append(measure_bandwidth(args.bandwidth_mib, "before"))
    weight_bytes = bytes_read_per_token(model.params, cfg, args.batch)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab, args.prompt_len).tolist()
    prompts = [prompt] * args.batch  # xFT: the same fixed prompt in every row
    if "jax" in backends:
        t0 = time.perf_counter()
        engine = model.engine(Runtime(tp=args.tp))
        transport = "mpi" if engine.comm.per_process else "devices"
        info["tp"] = {"ranks": engine.comm.size, "transport": transport}
        info["device_put_seconds"] = r3(time.perf_counter() - t0)
        if "numpy" not in backends:
            model.params = None  # the engine holds its own copy; halve the peak for huge shapes

    def once(backend, probe=False):
        if backend == "jax" and args.mode == "loop":
            return decode_loop_once(model, prompts, args, probe)
        return decode_once(model, backend, prompts, args, probe and backend == "jax")

    warm, runs, rss = {b: [] for b in backends}, {b: [] for b in backends}, {}
    for backend in backends:
        log(f"decode on {backend}: {args.warmup} warm-up run(s)")
        warm[backend] = [once(backend, probe=i == 0) for i in range(args.warmup)]
        rss[backend] = peak_rss_bytes()  # the high-water mark once this backend has run
    log(f"decode: {args.iterations} timed iterations of {', '.join(backends)}")
    for _ in range(args.iterations):
        for backend in backends:
            runs[backend].append(once(backend))
    if args.bandwidth_mib > 0:
        samples.append(measure_bandwidth(args.bandwidth_mib, "after"))
    bandwidth = combine_bandwidth(samples)
    context = args.prompt_len + args.new_tokens // 2  # mean context of the timed steps
    kv_bytes = kv_bytes_read(cfg, args.batch, context, args.kv_dtype)
    step_floor = floor(weight_bytes, kv_bytes, context, bandwidth)
    results = {}
    for backend in backends:
        r = backend_report(model, backend, warm[backend], runs[backend], args)
        r["peak_rss_bytes"] = rss[backend]
        nt, ms = r["next_token_ms"], step_floor["ms"]
        r["next_token_vs_floor"] = r3(nt["mean"] / ms) if ms else None
        r["next_token_p50_vs_floor"] = r3(nt["p50"] / ms) if ms and nt["p50"] else None
        results[backend] = r
    report = {
        "kind": "decode",
        "model": info,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "bandwidth": bandwidth,
        "floor": step_floor,
        "communication": communication(cfg, args.batch, info.get("tp", {}).get("ranks", 1)),
        "backends": results,
    }
    if args.compare:
        j, n = results["jax"], results["numpy"]

        def ratio(field, stat):
            a, b = n[field][stat], j[field][stat]
            return r3(a / b) if a and b else None

        report["compare"] = {
            "numpy_over_jax_next_token": ratio("next_token_ms", "mean"),
            "numpy_over_jax_next_token_p50": ratio("next_token_ms", "p50"),
            "numpy_over_jax_first_token": ratio("first_token_ms", "mean"),
        }
    return report


def summary(r: dict) -> str:
    m, s, f = r["model"], r["settings"], r["floor"]
    layers = f"{m['layers']} layers" + (
        f" (overridden from {m['layers_overridden_from']})" if m["layers_overridden_from"] else ""
    )
    lines = [
        f"decode: {m['source']}, {m['params'] / 1e6:.0f}M params, {layers}; batch {s['batch']}, "
        f"prompt {s['prompt_len']}, {s['new_tokens']} new, {s['kv_dtype']} cache, "
        f"{s['attention']}",
        f"  floor {f['ms']} ms/token ({f['weight_bytes_per_token'] / 1e6:.0f} MB weights), "
        f"{f['ms_with_kv']} ms with KV",
        f"  {'backend':8s} {'first ms':>9s} {'next ms':>8s} {'p90':>8s} {'tok/s':>8s} "
        f"{'x floor':>8s} {'compile s':>9s} {'peak MiB':>9s}",
    ]
    for name, b in r["backends"].items():
        nt = b["next_token_ms"]
        lines.append(
            f"  {name:8s} {b['first_token_ms']['mean']:9.2f} {nt['mean']:8.2f} {nt['p90']!s:>8} "
            f"{b['throughput_tokens_per_s']:8.1f} {b['next_token_vs_floor']!s:>8} "
            f"{b['compile_seconds']!s:>9} {b['peak_rss_bytes'] / 2**20:9,.0f}"
        )
    if "compare" in r:
        c = r["compare"]
        lines.append(
            f"  numpy / jax: next token {c['numpy_over_jax_next_token']}x, "
            f"first token {c['numpy_over_jax_first_token']}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["decode", *sys.argv[1:]]))
