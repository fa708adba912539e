"""Decode latency the way xFasterTransformer measures it (PAPER.md section 8).

A fixed prompt of N tokens for each of B rows, greedy, `warmup` untimed runs then `iterations`
timed ones. First-token latency is the time from the call to the first chosen token (cache
allocation, prefill, first sample); next-token latency is the time between consecutive tokens
(mean and p90 over every step of every iteration); throughput without the first token is
`1000 / next_ms * B`. Timestamps come from the public `slimllm.generate` streaming callback, so
both backends are timed on the path users run. The floor is the weight (and KV) bytes a step
reads, as stored in the run's weight format, over the read bandwidth measured in the same run
(bandwidth.py). Peak memory is the process's `ru_maxrss` and JAX's live device buffers.

Several weight formats (`--weights float32,bfloat16,int8`) are one model encoded once per
format and timed in turns, iteration by iteration with the backends, so that load from other
processes falls on every variant alike; each format is reported against the first listed.

`python -m bench.decode [options]` (or `slimllm bench decode`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np

from slimllm.api import Model, generate
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.runtime import Runtime
from slimllm.reference.weight_format import encode_params, weight_bytes, weight_format

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
    "kernels",
)


def live_device_bytes() -> int:
    return int(sum(a.nbytes for a in jax.live_arrays()))


def device_weight_bytes(engine) -> int:
    """Bytes of an engine's device weights (its own format and layout)."""
    return int(sum(getattr(a, "nbytes", 0) for a in jax.tree_util.tree_leaves(engine.params)))


def format_group(name: str, group: int | None) -> int | None:
    """The --weight-group a format uses: only scaled formats (int8, int4) have groups."""
    fmt = weight_format(name)
    return group if fmt.matrices.scaled or fmt.tables.scaled else None


def in_format(model: Model, name: str, group: int | None) -> Model:
    """The model with its weights stored in format `name` (the model itself when they are)."""
    if (name, group) == (model.weights, model.weight_group):
        return model
    params = encode_params(model.params, weight_format(name), group)
    return dataclasses.replace(
        model, params=params, weights=name, weight_group=group, _engines={}, _formats={}
    )


def runtime(args, backend: str, name: str, group: int | None, kernels: str) -> Runtime:
    """The run settings of one timed variant (tp only on jax; numpy has no kernels to choose)."""
    return Runtime(
        backend=backend,
        attention=args.attention,
        kv_dtype=args.kv_dtype,
        tp=args.tp if backend == "jax" else 1,
        weights=name,
        weight_group=group,
        kernels=kernels,
    )


def decode_once(model, rt: Runtime, prompts, args, probe: bool = False) -> dict:
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
        runtime=rt,
    )
    stamps = np.asarray(stamps)  # the probe runs after the first stamp, in an untimed run
    return {
        "first_ms": (stamps[0] - t0) * 1e3,
        "next_ms": list(np.diff(stamps) * 1e3),
        "prefill_ms": out.prefill_seconds * 1e3,
        "compile_seconds": out.compile_seconds,
        "device_bytes": live[0] if live else None,
    }


def decode_loop_once(model, rt: Runtime, prompts, args, probe: bool = False) -> dict:
    """One generation as a single compiled loop (no host per token): only the mean step time."""
    out = generate(
        model, ids=prompts, max_new_tokens=args.new_tokens, eos_ids=(), runtime=rt, mode="loop"
    )
    steps = max(out.decode_steps, 1)
    return {
        "first_ms": out.prefill_seconds * 1e3,
        "next_ms": [out.decode_seconds * 1e3 / steps],
        "prefill_ms": out.prefill_seconds * 1e3,
        "compile_seconds": out.compile_seconds,
        "device_bytes": live_device_bytes() if probe else None,
    }


def backend_report(engine, backend: str, warm: list, runs: list, args) -> dict:
    """xFT's fields for one backend from its warm-up and timed runs (`engine`: jax's, or None)."""
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
    if engine is not None:
        programs = {}  # compile seconds per program (summed over shapes)
        for key, c in getattr(engine, "programs", {}).items():
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


def floor(
    name: str, weight_bytes: int, kv_bytes: int, context: int, bandwidth: dict | None
) -> dict:
    """The bandwidth floor of one step with weights in format `name`: its bytes over the read
    bandwidth (None unmeasured)."""
    gbs = bandwidth["read_gbs"] if bandwidth else None
    return {
        "weights": name,
        "weight_bytes_per_token": weight_bytes,
        "kv_bytes_per_token": kv_bytes,
        "mean_context": context,
        "ms": r3(weight_bytes / gbs / 1e6) if gbs else None,
        "ms_with_kv": r3((weight_bytes + kv_bytes) / gbs / 1e6) if gbs else None,
    }


def ratio(a, b):
    return r3(a / b) if a and b else None


def run(args, bandwidth: dict | None = None) -> dict:
    """xFT's decode benchmark for one model on one or both backends, in one or several weight
    formats (all variants interleaved, so that load from other processes falls on each alike)."""
    model, info = build_model(args)
    cfg = model.cfg
    if args.batch < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        raise OptionError("need --batch >= 1, --prompt-len >= 1 and --new-tokens >= 2")
    if args.prompt_len + args.new_tokens > cfg.max_len:
        raise OptionError(f"--prompt-len + --new-tokens exceeds the model's context {cfg.max_len}")
    backends = ["jax", "numpy"] if args.compare else [args.backend]
    names = list(args.weights or (model.weights,))  # the first is the base of the ratios
    groups = {name: format_group(name, args.weight_group) for name in names}
    samples = [bandwidth] if bandwidth else []
    if not samples and args.bandwidth_mib > 0:
        samples.append(measure_bandwidth(args.bandwidth_mib, "before"))
    models = {}
    for name in names:  # every format from the loaded weights, before any is dropped
        if (name, groups[name]) != (model.weights, model.weight_group):
            log(f"weights as {name}" + (f", groups of {groups[name]}" if groups[name] else ""))
        models[name] = in_format(model, name, groups[name])
    step_bytes = {n: bytes_read_per_token(m.params, cfg, args.batch) for n, m in models.items()}
    stored = {n: weight_bytes(m.params) for n, m in models.items()}
    rts = {(n, b): runtime(args, b, n, groups[n], args.kernels) for n in names for b in backends}
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab, args.prompt_len).tolist()
    prompts = [prompt] * args.batch  # xFT: the same fixed prompt in every row
    engines, device_put = {}, {}
    if "jax" in backends:
        for name in names:
            t0 = time.perf_counter()
            engines[name] = models[name].engine(rts[(name, "jax")])
            device_put[name] = r3(time.perf_counter() - t0)
        engine = engines[names[0]]
        transport = "mpi" if engine.comm.per_process else "devices"
        info["tp"] = {"ranks": engine.comm.size, "transport": transport}
        info["device_put_seconds"] = device_put[names[0]]
        if "numpy" not in backends:  # the engines hold their own copies: drop the host ones
            model.params = None  # (halves the peak for huge shapes)
            for m in models.values():
                m.params = None

    def once(name, backend, probe=False):
        rt = rts[(name, backend)]
        if backend == "jax" and args.mode == "loop":
            return decode_loop_once(models[name], rt, prompts, args, probe)
        return decode_once(models[name], rt, prompts, args, probe and backend == "jax")

    variants = [(n, b) for n in names for b in backends]
    warm, runs, rss = {v: [] for v in variants}, {v: [] for v in variants}, {}
    for name, backend in variants:
        log(f"decode on {backend}, {name} weights: {args.warmup} warm-up run(s)")
        warm[(name, backend)] = [once(name, backend, probe=i == 0) for i in range(args.warmup)]
        rss[(name, backend)] = peak_rss_bytes()  # the high-water mark once this one has run
    described = ", ".join(f"{b} {n}" if len(names) > 1 else b for n, b in variants)
    log(f"decode: {args.iterations} timed iterations of {described}")
    for _ in range(args.iterations):
        for variant in variants:
            runs[variant].append(once(*variant))
    if args.bandwidth_mib > 0:
        samples.append(measure_bandwidth(args.bandwidth_mib, "after"))
    bandwidth = combine_bandwidth(samples)
    context = args.prompt_len + args.new_tokens // 2  # mean context of the timed steps
    kv_bytes = kv_bytes_read(cfg, args.batch, context, args.kv_dtype)
    formats = {}
    for name in names:
        step_floor = floor(name, step_bytes[name], kv_bytes, context, bandwidth)
        results = {}
        for backend in backends:
            v = (name, backend)
            engine = engines.get(name) if backend == "jax" else None
            r = backend_report(engine, backend, warm[v], runs[v], args)
            r["peak_rss_bytes"] = rss[v]
            nt, ms = r["next_token_ms"], step_floor["ms"]
            r["next_token_vs_floor"] = r3(nt["mean"] / ms) if ms else None
            r["next_token_p50_vs_floor"] = r3(nt["p50"] / ms) if ms and nt["p50"] else None
            results[backend] = r
        formats[name] = {
            "weights": name,
            "weight_group": groups[name],
            "weight_bytes": stored[name],
            "floor": step_floor,
            "backends": results,
        }
        if name in engines:
            formats[name] |= {
                "device_put_seconds": device_put[name],
                "device_weight_bytes": device_weight_bytes(engines[name]),
            }
        if args.compare:
            j, n = results["jax"], results["numpy"]
            formats[name]["compare"] = {
                "numpy_over_jax_next_token": ratio(
                    n["next_token_ms"]["mean"], j["next_token_ms"]["mean"]
                ),
                "numpy_over_jax_next_token_p50": ratio(
                    n["next_token_ms"]["p50"], j["next_token_ms"]["p50"]
                ),
                "numpy_over_jax_first_token": ratio(
                    n["first_token_ms"]["mean"], j["first_token_ms"]["mean"]
                ),
            }
    base = formats[names[0]]
    report = {
        "kind": "decode",
        "model": info,
        "settings": {k: getattr(args, k) for k in SETTINGS}
        | {"weights": names, "weight_group": args.weight_group},
        "bandwidth": bandwidth,
        # The first listed format's floor, backends and comparison (the only one by default).
        "floor": base["floor"],
        "communication": communication(cfg, args.batch, info.get("tp", {}).get("ranks", 1)),
        "backends": base["backends"],
    }
    if args.compare:
        report["compare"] = base["compare"]
    if len(names) > 1:
        report["formats"] = formats
        report["compare_weights"] = compare_weights(formats, names, backends)
    return report


def compare_weights(formats: dict, names: list[str], backends: list[str]) -> dict:
    """Each format's latencies over the first listed format's, per backend (below 1: faster)."""
    out = {"base": names[0]}
    for backend in backends:
        base = formats[names[0]]["backends"][backend]
        out[backend] = {}
        for name in names[1:]:
            r = formats[name]["backends"][backend]
            out[backend][name] = {
                "next_token": ratio(r["next_token_ms"]["mean"], base["next_token_ms"]["mean"]),
                "next_token_p50": ratio(r["next_token_ms"]["p50"], base["next_token_ms"]["p50"]),
                "first_token": ratio(r["first_token_ms"]["mean"], base["first_token_ms"]["mean"]),
            }
    return out


def summary(r: dict) -> str:
    m, s = r["model"], r["settings"]
    layers = f"{m['layers']} layers" + (
        f" (overridden from {m['layers_overridden_from']})" if m["layers_overridden_from"] else ""
    )
    formats = r.get("formats") or {r["floor"]["weights"]: r}
    lines = [
        f"decode: {m['source']}, {m['params'] / 1e6:.0f}M params, {layers}; batch {s['batch']}, "
        f"prompt {s['prompt_len']}, {s['new_tokens']} new, {s['kv_dtype']} cache, "
        f"{s['attention']}, kernels {s['kernels']}",
        f"  {'weights':9s} {'MB/token':>8s} {'floor ms':>8s} {'backend':8s} {'first ms':>9s} "
        f"{'next ms':>8s} {'p90':>8s} {'tok/s':>8s} {'x floor':>8s} {'compile s':>9s} "
        f"{'peak MiB':>9s}",
    ]
    for name, f in formats.items():
        fl = f["floor"]
        for backend, b in f["backends"].items():
            nt = b["next_token_ms"]
            lines.append(
                f"  {name:9s} {fl['weight_bytes_per_token'] / 1e6:8.1f} {fl['ms']!s:>8} "
                f"{backend:8s} {b['first_token_ms']['mean']:9.2f} {nt['mean']:8.2f} "
                f"{nt['p90']!s:>8} {b['throughput_tokens_per_s']:8.1f} "
                f"{b['next_token_vs_floor']!s:>8} {b['compile_seconds']!s:>9} "
                f"{b['peak_rss_bytes'] / 2**20:9,.0f}"
            )
    for name, f in formats.items():
        if "compare" in f:
            c = f["compare"]
            lines.append(
                f"  numpy / jax, {name}: next token {c['numpy_over_jax_next_token']}x, "
                f"first token {c['numpy_over_jax_first_token']}x"
            )
    if "compare_weights" in r:
        c = r["compare_weights"]
        for backend, ratios in c.items():
            if backend != "base":
                listed = ", ".join(f"{n} {v['next_token']}x" for n, v in ratios.items())
                lines.append(f"  next token over {c['base']}, {backend}: {listed}")
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["decode", *sys.argv[1:]]))
