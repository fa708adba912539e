"""Benchmarks with JSON output: decode latency the way xFasterTransformer measures it, two
micro-benchmarks, and the machine's memory bandwidth with the floor it sets.

Decode (PAPER.md section 8, xFT's method): a fixed prompt of N tokens for each of B rows, greedy,
`warmup` untimed runs then `iterations` timed ones. First-token latency is the time from the
call to the first chosen token (cache allocation, prefill, first sample); next-token latency is
the time between consecutive tokens (mean and p90 over every step of every iteration);
throughput without the first token is `1000 / next_ms * B`. Timestamps come from the public
`slimllm.generate` streaming callback, so both backends are timed on the path users run.

Single-row decode reads every weight once per token, so it is bound by memory bandwidth: the
floor is `weight bytes read per token / read bandwidth`, measured in the same run with a jitted
XLA reduction over a large float32 array (bytes read) and, for comparison, a NumPy copy (bytes
read + written). Peak memory is the process's `ru_maxrss` and JAX's live device buffers.

Micro-benchmarks, JAX backend, jitted, `block_until_ready`, median of runs:
- `attention`: one attention layer's prefill (the paper's figure: 1024 tokens, d=128,
  FlashAttention 61.57 ms vs SlimAttention 16.02 ms) for naive, slim and flash.
- `kv-decode`: one decode step at a long context (default 4096, batch 4) per KV cache dtype,
  both for the whole model step and for the attention layer alone.

Nothing here is asserted by the tests: numbers depend on the machine and its load, so compare
ratios taken within one run. Implementation of `slimllm bench` and of the scripts in `bench/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from slimllm.reference.config import ModelConfig
from slimllm.reference.runtime import Runtime

SCHEMA = "slimllm.bench/1"
KINDS = ("decode", "attention", "kv-decode", "bandwidth", "targets")

# A ~150M-parameter Llama shape (the decode target) and a tiny one for smoke tests.
PRESETS = {
    "150m": ModelConfig(
        vocab=32000,
        width=1024,
        n_layers=8,
        n_heads=16,
        n_kv_heads=4,
        head_dim=64,
        ffn_width=2816,
        max_len=4096,
    ),
    "tiny": ModelConfig(
        vocab=256,
        width=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_width=128,
        max_len=512,
    ),
}
# Real published shapes: config.json files in ../shared/configs (random weights, real sizes).
REAL_PRESETS = ("llama-3-8b", "qwen2-0_5b", "qwen3-0_6b")


def log(*parts) -> None:
    """Progress goes to stderr, so stdout stays one JSON object."""
    print("bench:", *parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models


def shared_dir() -> Path:
    beside_checkout = Path(__file__).resolve().parents[2] / "shared"
    return Path(os.environ.get("SLIMLLM_SHARED", beside_checkout))


def resolve_config(preset: str | None, config: str | None, layers: int | None):
    """The model config to benchmark and a description of where it came from."""
    from slimllm.weights import load_config

    if config:
        cfg, source = load_config(config), f"config:{config}"
    elif preset in PRESETS:
        cfg, source = PRESETS[preset], f"preset:{preset}"
    elif preset in REAL_PRESETS:
        path = shared_dir() / "configs" / preset / "config.json"
        if not path.exists():
            raise ValueError(f"preset {preset!r} reads {path}: not found (set SLIMLLM_SHARED)")
        cfg, source = load_config(path), f"preset:{preset}"
    else:
        raise ValueError(f"unknown preset {preset!r}: expected one of {(*PRESETS, *REAL_PRESETS)}")
    info = {"source": source, "layers": cfg.n_layers, "layers_overridden_from": None}
    if layers is not None and layers != cfg.n_layers:
        if layers < 1:
            raise ValueError(f"--layers must be positive, got {layers}")
        info |= {"layers": layers, "layers_overridden_from": cfg.n_layers}
        cfg = cfg.replace(n_layers=layers)
    return cfg, info


def build_model(args):
    """A random-weight model of the chosen shape, or a real checkpoint (--model)."""
    from slimllm.api import Model, load

    t0 = time.perf_counter()
    if args.model:
        model = load(args.model)
        info = {
            "source": f"checkpoint:{args.model}",
            "layers": model.cfg.n_layers,
            "layers_overridden_from": None,
        }
        if args.layers is not None and args.layers != model.cfg.n_layers:
            n = args.layers
            info |= {"layers": n, "layers_overridden_from": model.cfg.n_layers}
            model.cfg = model.cfg.replace(n_layers=n)
            model.params = dataclasses.replace(model.params, layers=model.params.layers[:n])
    else:
        cfg, info = resolve_config(args.preset, args.config, args.layers)
        log(f"random weights for {info['source']} ({cfg.n_params() / 1e6:.0f}M parameters)")
        model = Model(cfg, random_params(cfg), family="random", source=info["source"])
    cfg = model.cfg
    info |= {
        "params": cfg.n_params(),
        "weight_bytes": param_bytes(model.params),
        "init_seconds": round(time.perf_counter() - t0, 3),
        "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
    }
    return model, info


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random weights with `init_params`'s rules (N(0, 1/fan_in) matrices, norms near 1, small
    biases), drawn directly in float32: half the time and memory for multi-GB shapes."""
    from slimllm.reference.params import LayerParams, Params, layer_shapes, model_shapes

    rng = np.random.default_rng(seed)

    def draw(name, shape):
        x = rng.standard_normal(shape, np.float32)
        if name.endswith("norm"):
            x *= np.float32(0.1)
            x += np.float32(1.0)
        elif len(shape) == 1:
            x *= np.float32(0.1)
        elif name not in ("embed", "pos_embed"):
            x *= np.float32(1 / np.sqrt(shape[0]))
        return x

    layers = [
        LayerParams(**{n: draw(n, s) for n, s in layer_shapes(cfg).items()})
        for _ in range(cfg.n_layers)
    ]
    return Params(layers=layers, **{n: draw(n, s) for n, s in model_shapes(cfg).items()})


def param_bytes(params) -> int:
    arrays = [getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "layers"]
    for layer in params.layers:
        arrays += [getattr(layer, f.name) for f in dataclasses.fields(layer)]
    return int(sum(a.nbytes for a in arrays if a is not None))


def bytes_read_per_token(params, cfg: ModelConfig, batch: int) -> int:
    """Weight bytes one decode step must read: every weight except the embedding table, of
    which only the B looked-up rows are read (unless it doubles as the LM head)."""
    total = param_bytes(params)
    if not cfg.tied_head:
        e = params.embed
        total -= e.nbytes - batch * e.shape[1] * e.itemsize
    return int(total)


def kv_bytes_read(cfg: ModelConfig, batch: int, context: int, kv_dtype: str) -> int:
    """KV cache bytes attention reads at this context (values and int8 scales, all layers)."""
    from slimllm.reference.kv_cache import nbytes_per_token

    return int(nbytes_per_token(cfg, kv_dtype) * batch * context)


# ---------------------------------------------------------------- measuring


def stats(values) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "min": None, "max": None}
    return {
        "n": int(v.size),
        "mean": r3(v.mean()),
        "p50": r3(np.percentile(v, 50)),
        "p90": r3(np.percentile(v, 90)),
        "min": r3(v.min()),
        "max": r3(v.max()),
    }


def r3(x) -> float:
    return round(float(x), 3)


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def live_device_bytes() -> int:
    import jax

    return int(sum(a.nbytes for a in jax.live_arrays()))


def timed(fn, runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls of fn (fn blocks until its result is ready)."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def machine() -> dict:
    import jax

    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jax_devices": jax.device_count(),
    }


# ---------------------------------------------------------------- memory bandwidth


def memory_bandwidth(mib: int = 1024, runs: int = 5) -> dict:
    """Best of `runs`: NumPy `dst[:] = src` (bytes read + written) and a jitted XLA sum over a
    float32 array (bytes read). The read bandwidth sets the decode floor."""
    n = mib * 2**20 // 4
    copy_gbs = 2 * n * 4 / min(numpy_copy_ms(n, runs)) / 1e6
    read_gbs = n * 4 / min(xla_reduce_ms(n, runs)) / 1e6
    return {
        "bytes": n * 4,
        "runs": runs,
        "numpy_copy_gbs": r3(copy_gbs),
        "xla_reduce_read_gbs": r3(read_gbs),
        "read_gbs": r3(read_gbs),
    }


def numpy_copy_ms(n: int, runs: int) -> list[float]:
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)

    def copy():
        dst[:] = src

    return timed(copy, runs)


def xla_reduce_ms(n: int, runs: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    x = jnp.ones(n, jnp.float32)
    reduce = jax.jit(jnp.sum)
    reduce(x).block_until_ready()
    return timed(lambda: reduce(x).block_until_ready(), runs)


def measure_bandwidth(mib: int, when: str) -> dict:
    """`memory_bandwidth`, in a child process for large arrays so that they never count in this
    process's peak memory (small ones, as in tests, run here: a child costs a JAX import)."""
    import json
    import subprocess

    log(f"memory bandwidth over {mib} MiB ({when})")
    if mib <= 64:
        return memory_bandwidth(mib) | {"when": when}
    cmd = [sys.executable, "-m", "slimllm.bench", "bandwidth", "--bandwidth-mib", str(mib)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"bandwidth measurement failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)["bandwidth"] | {"when": when}


def combine_bandwidth(samples: list[dict]) -> dict | None:
    """The best of measurements taken at different times of a run (the machine is shared: the
    best one is closest to what the hardware can do, so the floor is never too lenient)."""
    if not samples:
        return None
    best = {
        k: max(s[k] for s in samples) for k in ("numpy_copy_gbs", "xla_reduce_read_gbs", "read_gbs")
    }
    return {"bytes": samples[0]["bytes"], **best, "samples": samples}


# ---------------------------------------------------------------- decode (xFT's method)


def decode_once(model, backend: str, prompts, args, probe: bool = False) -> dict:
    """One generation; first-token and per-token latencies in ms (and, when probing, the live
    device bytes at the first token: weights, cache and activations)."""
    from slimllm.api import generate

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
    from slimllm.api import generate

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


def bench_decode(args, bandwidth: dict | None = None) -> dict:
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

    def run(backend, probe=False):
        if backend == "jax" and args.mode == "loop":
            return decode_loop_once(model, prompts, args, probe)
        return decode_once(model, backend, prompts, args, probe and backend == "jax")

    warm, runs, rss = {b: [] for b in backends}, {b: [] for b in backends}, {}
    for backend in backends:
        log(f"decode on {backend}: {args.warmup} warm-up run(s)")
        warm[backend] = [run(backend, probe=i == 0) for i in range(args.warmup)]
        rss[backend] = peak_rss_bytes()  # the high-water mark once this backend has run
    log(f"decode: {args.iterations} timed iterations of {', '.join(backends)}")
    for _ in range(args.iterations):
        for backend in backends:
            runs[backend].append(run(backend))
    if args.bandwidth_mib > 0:
        samples.append(measure_bandwidth(args.bandwidth_mib, "after"))
    bandwidth = combine_bandwidth(samples)
    context = args.prompt_len + args.new_tokens // 2  # mean context of the timed steps
    kv_bytes = kv_bytes_read(cfg, args.batch, context, args.kv_dtype)
    floor = {
        "weight_bytes_per_token": weight_bytes,
        "kv_bytes_per_token": kv_bytes,
        "mean_context": context,
        "ms": None,
        "ms_with_kv": None,
    }
    if bandwidth:
        gbs = bandwidth["read_gbs"]
        floor |= {
            "ms": r3(weight_bytes / gbs / 1e6),
            "ms_with_kv": r3((weight_bytes + kv_bytes) / gbs / 1e6),
        }
    results = {}
    for backend in backends:
        r = backend_report(model, backend, warm[backend], runs[backend], args)
        r["peak_rss_bytes"] = rss[backend]
        nt = r["next_token_ms"]
        r["next_token_vs_floor"] = r3(nt["mean"] / floor["ms"]) if floor["ms"] else None
        r["next_token_p50_vs_floor"] = (
            r3(nt["p50"] / floor["ms"]) if floor["ms"] and nt["p50"] else None
        )
        results[backend] = r
    report = {
        "kind": "decode",
        "model": info,
        "settings": {
            k: getattr(args, k)
            for k in (
                "batch",
                "prompt_len",
                "new_tokens",
                "kv_dtype",
                "attention",
                "iterations",
                "warmup",
                "mode",
            )
        },
        "bandwidth": bandwidth,
        "floor": floor,
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


# ---------------------------------------------------------------- attention micro-benchmark


def random_layer_kv(b: int, kh: int, s: int, d: int, kv_dtype: str, seed: int = 0):
    """A filled cache layer of s slots: random K/V stored in kv_dtype (drawn and quantised in
    NumPy, bit-identical to the JAX encoding, so no eager JAX ops need compiling)."""
    import jax.numpy as jnp

    from slimllm.jaxbackend.kv_cache import LayerKV, kv_format
    from slimllm.reference.kv_cache import encode

    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(2):  # K, then V
        x = rng.standard_normal((b, kh, s, d), np.float32)  # [b,k,s,d]
        stored, scale = encode(x, kv_dtype)
        stored = stored.view(kv_format(kv_dtype).storage)  # same bits (bf16: uint16 -> bfloat16)
        parts += [jnp.asarray(stored), None if scale is None else jnp.asarray(scale)]
    k, k_scale, v, v_scale = parts
    return LayerKV(k, v, k_scale, v_scale, kv_format(kv_dtype))


def causal_bias(cfg: ModelConfig, b: int, start: int, t: int, s: int):
    """Bias [b,1,t,s] of t queries at slots start.. over s key slots (as the model builds it)."""
    import jax.numpy as jnp

    from slimllm.reference.attention import attention_bias
    from slimllm.reference.positions import Positions

    slots = np.broadcast_to(start + np.arange(t)[None, :], (b, t))  # [b,t]
    pos = Positions(slots, slots, np.zeros(b, np.int64), np.ones(b, np.float32))
    return jnp.asarray(attention_bias(cfg, pos, s), jnp.float32)


def interleaved(calls: dict, runs: int) -> dict:
    """Milliseconds of `runs` calls of each callable, taken in turns (one call of each per
    round), so that a change of machine load falls on every variant alike."""
    out = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            out[name] += timed(call, 1)
    return out


def compiled_attention(kind: str, q, kv, bias):
    """One attention call jitted ahead of time -> (compile seconds, call, output)."""
    import jax

    from slimllm.jaxbackend.kv_cache import LayerKV
    from slimllm.jaxbackend.runtime import ATTENTION

    scale = q.shape[-1] ** -0.5
    arrays = (kv.k, kv.v, kv.k_scale, kv.v_scale)  # LayerKV is not a pytree: pass its arrays

    def attend(q, arrays, bias):
        return ATTENTION[kind](q, LayerKV(*arrays, kv.fmt), bias, scale)

    t0 = time.perf_counter()
    program = jax.jit(attend).lower(q, arrays, bias).compile()
    compile_s = time.perf_counter() - t0
    out = program(q, arrays, bias).block_until_ready()  # one untimed run
    return compile_s, lambda: program(q, arrays, bias).block_until_ready(), out


def timing(compile_s: float, ms: list[float]) -> dict:
    return {"compile_seconds": r3(compile_s), "median_ms": r3(np.median(ms)), "min_ms": r3(min(ms))}


def bench_attention(args) -> dict:
    """One attention layer's prefill: t queries at slots 0..t-1 over a filled cache of t slots."""
    import jax.numpy as jnp

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


# ---------------------------------------------------------------- KV-cache decode micro-benchmark


def filled_cache(cfg: ModelConfig, b: int, context: int, kv_dtype: str):
    """A cache of `context` slots whose every slot holds random K/V (as after a long prompt)."""
    import jax

    from slimllm.jaxbackend.kv_cache import KVCache, padded_len

    if padded_len(context) != context:
        raise ValueError(f"--context {context} must be a multiple of 64 (256 above 256)")
    layers = [
        random_layer_kv(b, cfg.n_kv_heads, context, cfg.head_dim, kv_dtype, seed=i)
        for i in range(cfg.n_layers)
    ]
    scales = layers[0].k_scale is not None
    cache = KVCache(
        tuple(x.k for x in layers),
        tuple(x.v for x in layers),
        tuple(x.k_scale for x in layers) if scales else None,
        tuple(x.v_scale for x in layers) if scales else None,
        kv_dtype,
    )
    jax.block_until_ready(cache)
    return cache


def compiled_step(params, cfg: ModelConfig, b: int, context: int, kv_dtype: str, attention: str):
    """The whole model's decode step at slot context-1, jitted like the engine's with the cache
    donated -> (compile seconds, call that runs one step and keeps the returned cache)."""
    import functools

    import jax
    import jax.numpy as jnp

    from slimllm.jaxbackend.generate import decode_fn
    from slimllm.jaxbackend.positions import SeqState

    cache = filled_cache(cfg, b, context, kv_dtype)
    zeros = jnp.zeros(b, jnp.int32)
    state = SeqState(jnp.full(b, context - 1, jnp.int32), zeros, zeros, jnp.ones(b, jnp.float32))
    ids = jnp.ones(b, jnp.int32)
    fn = functools.partial(decode_fn, cfg=cfg, rt=Runtime(attention=attention))
    t0 = time.perf_counter()
    program = jax.jit(fn, donate_argnums=(2,)).lower(params, ids, cache, state).compile()
    compile_s = time.perf_counter() - t0
    box = [cache]

    def step():
        logits, box[0] = program(params, ids, box[0], state)
        logits.block_until_ready()

    step()  # one untimed run
    return compile_s, step


def bench_kv_decode(args, bandwidth: dict | None = None) -> dict:
    """Decode at a long context per KV dtype: the whole model step and the attention layer."""
    import jax.numpy as jnp

    model, info = build_model(args)
    cfg = model.cfg
    b, ctx = args.kv_batch, args.context
    if ctx > cfg.max_len:
        raise ValueError(f"--context {ctx} exceeds the model's context {cfg.max_len}")
    engine = model.engine()
    weight_bytes = bytes_read_per_token(model.params, cfg, b)
    model.params = None
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, 1, cfg.n_heads, cfg.head_dim), np.float32))
    bias = causal_bias(cfg, b, ctx - 1, 1, ctx)  # [b,1,1,s]
    compiled, calls = {}, {}
    for dtype in args.kv_dtypes:
        log(f"decode step at context {ctx}, batch {b}, {dtype} cache, {args.attention}")
        step_s, calls[("model_step", dtype)] = compiled_step(
            engine.params, cfg, b, ctx, dtype, args.attention
        )
        kv = random_layer_kv(b, cfg.n_kv_heads, ctx, cfg.head_dim, dtype)
        attention = compiled_attention(args.attention, q, kv, bias)
        layer_s, calls[("attention_layer", dtype)] = attention[:2]
        compiled |= {("model_step", dtype): step_s, ("attention_layer", dtype): layer_s}
    log(f"kv-decode: {args.runs} interleaved runs")
    ms = interleaved(calls, args.runs)
    dtypes = {}
    for dtype in args.kv_dtypes:
        parts = ("model_step", "attention_layer")
        row = {part: timing(compiled[(part, dtype)], ms[(part, dtype)]) for part in parts}
        row["kv_bytes_per_step"] = kv_bytes = kv_bytes_read(cfg, b, ctx, dtype)
        if bandwidth:
            row["floor_ms"] = r3((weight_bytes + kv_bytes) / bandwidth["read_gbs"] / 1e6)
            row["model_step_vs_floor"] = r3(row["model_step"]["median_ms"] / row["floor_ms"])
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
    if "int8" in dtypes and "float32" in dtypes:
        for part in ("model_step", "attention_layer"):
            ratio = dtypes["int8"][part]["median_ms"] / dtypes["float32"][part]["median_ms"]
            report[f"int8_over_float32_{part}"] = r3(ratio)
    return report


# ---------------------------------------------------------------- the targets in one run


def bench_targets(args) -> dict:
    """Bandwidth, then the three measurements the issue sets targets for, judged (not asserted)."""
    bw = measure_bandwidth(max(args.bandwidth_mib, 1), "before")
    base = dict(vars(args))
    decode = bench_decode(argparse.Namespace(**base | {"compare": True}), bw)
    bw = decode["bandwidth"]  # before and after the decode runs
    kinds = ("naive", "slim", "flash")
    attn = bench_attention(argparse.Namespace(**base | {"batch": 1, "kinds": kinds}))
    kv = bench_kv_decode(argparse.Namespace(**base | {"kv_dtypes": ("float32", "int8")}), bw)
    jax_next, compare = decode["backends"]["jax"], decode["compare"]
    targets = [
        target(
            "decode within 1.3x of the bandwidth floor",
            jax_next["next_token_vs_floor"],
            "<=",
            1.3,
            jax_next["next_token_p50_vs_floor"],
        ),
        target(
            "decode at least 1.5x faster than numpy",
            compare["numpy_over_jax_next_token"],
            ">=",
            1.5,
            compare["numpy_over_jax_next_token_p50"],
        ),
        target("slim prefill attention at most 0.5x flash", attn.get("slim_over_flash"), "<=", 0.5),
        target(
            "int8 KV decode step faster than float32",
            kv.get("int8_over_float32_model_step"),
            "<",
            1.0,
        ),
    ]
    return {
        "kind": "targets",
        "bandwidth": bw,
        "targets": targets,
        "decode": decode,
        "attention": attn,
        "kv_decode": kv,
    }


def target(name: str, value, op: str, threshold: float, value_p50=None) -> dict:
    """A target judged on `value` (means, as xFT reports; medians alongside when they exist)."""
    compare = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b}[op]
    out = {
        "name": name,
        "value": value,
        "op": op,
        "threshold": threshold,
        "met": None if value is None else bool(compare(value, threshold)),
    }
    if value_p50 is not None:
        out |= {"value_p50": value_p50, "met_p50": bool(compare(value_p50, threshold))}
    return out


# ---------------------------------------------------------------- entry point


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `slimllm bench` (and the scripts in bench/)."""
    from slimllm.reference.kv_cache import KV_DTYPES
    from slimllm.reference.runtime import ATTENTION

    p.add_argument(
        "kind",
        nargs="?",
        choices=KINDS,
        default="decode",
        help="decode (default), attention / kv-decode micro-benchmarks, bandwidth, "
        "or targets (all of the issue's measurements in one run)",
    )
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "--preset",
        default="150m",
        choices=(*PRESETS, *REAL_PRESETS),
        help="model shape with random weights (default 150m)",
    )
    m.add_argument("--config", help="a config.json (random weights of that shape)")
    m.add_argument("--model", help="a real checkpoint (directory or llama2.c .bin)")
    p.add_argument("--layers", type=int, help="override the layer count (reported)")
    p.add_argument("--backend", choices=("jax", "numpy"), default="jax")
    p.add_argument("--compare", action="store_true", help="run jax and numpy, report the ratio")
    p.add_argument(
        "--mode",
        choices=("stream", "loop"),
        default="stream",
        help="jax decode: per-token steps timed (stream) or the one-program loop",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks (XLA devices here, or the mpiexec job's ranks)",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="float32")
    p.add_argument("--attention", choices=tuple(ATTENTION), default="naive")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--bandwidth-mib",
        type=int,
        default=1024,
        help="array size for the bandwidth measurement (0: skip)",
    )
    a = p.add_argument_group("micro-benchmarks")
    a.add_argument("--runs", type=int, default=10, help="timed runs (the median is reported)")
    a.add_argument("--tokens", type=int, default=1024, help="attention: prefill length")
    a.add_argument("--heads", type=int, default=32, help="attention: query heads")
    a.add_argument("--kv-heads", type=int, default=32, help="attention: kv heads")
    a.add_argument("--head-dim", type=int, default=128, help="attention: head dim")
    a.add_argument(
        "--kinds",
        nargs="+",
        choices=tuple(ATTENTION),
        default=tuple(ATTENTION),
        help="attention: kinds to time",
    )
    a.add_argument("--context", type=int, default=4096, help="kv-decode: keys in the cache")
    a.add_argument("--kv-batch", type=int, default=4, help="kv-decode: batch")
    a.add_argument(
        "--kv-dtypes",
        nargs="+",
        choices=KV_DTYPES,
        default=("float32", "int8"),
        help="kv-decode: cache dtypes to time",
    )
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--json", action="store_true", help="print the JSON report (else a table)")


def run(args) -> dict:
    """Run the benchmark `args.kind` and return its JSON report."""
    if args.iterations < 1 or args.warmup < 0 or args.runs < 1:
        raise ValueError("need --iterations >= 1, --warmup >= 0 and --runs >= 1")
    t0 = time.perf_counter()
    if args.kind == "decode":
        report = bench_decode(args)
    elif args.kind == "attention":
        report = bench_attention(args)
    elif args.kind == "kv-decode":
        bw = measure_bandwidth(args.bandwidth_mib, "before") if args.bandwidth_mib > 0 else None
        report = bench_kv_decode(args, combine_bandwidth([bw] if bw else []))
    elif args.kind == "bandwidth":  # in this process (measure_bandwidth runs this as a child)
        report = {"kind": "bandwidth", "bandwidth": memory_bandwidth(max(args.bandwidth_mib, 1))}
    else:
        report = bench_targets(args)
    report = {
        "schema": SCHEMA,
        **report,
        "machine": machine(),
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds": r3(time.perf_counter() - t0),
    }
    if args.out:
        import json

        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


# ---------------------------------------------------------------- human summary


def summary(report: dict) -> str:
    """A short table of the report's headline numbers."""
    kind = report["kind"]
    lines = []
    if kind == "targets":
        lines += [
            summary_bandwidth(report["bandwidth"]),
            summary_decode(report["decode"]),
            summary_attention(report["attention"]),
            summary_kv(report["kv_decode"]),
        ]
        lines.append("targets (mean; median in brackets):")
        for t in report["targets"]:
            mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            p50 = f"[{t['value_p50']}]" if "value_p50" in t else ""
            lines.append(
                f"  {t['name']:44s} {t['value']!s:>7} {p50:>8} {t['op']:2s} "
                f"{t['threshold']:<4} {mark}"
            )
    elif kind == "decode":
        lines.append(summary_decode(report))
    elif kind == "attention":
        lines.append(summary_attention(report))
    elif kind == "kv-decode":
        lines.append(summary_kv(report))
    else:
        lines.append(summary_bandwidth(report["bandwidth"]))
    lines.append(f"peak RSS {report['peak_rss_bytes'] / 2**20:,.0f} MiB, {report['seconds']} s")
    return "\n".join(lines)


def summary_bandwidth(bw) -> str:
    if not bw:
        return "bandwidth: not measured"
    return (
        f"bandwidth: XLA reduce {bw['xla_reduce_read_gbs']} GB/s read, "
        f"NumPy copy {bw['numpy_copy_gbs']} GB/s read+write ({bw['bytes'] / 2**20:.0f} MiB)"
    )


def summary_decode(r) -> str:
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


def summary_attention(r) -> str:
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


def summary_kv(r) -> str:
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
    if "int8_over_float32_model_step" in r:
        lines.append(
            f"  int8 / float32: model step {r['int8_over_float32_model_step']}, "
            f"attention {r['int8_over_float32_attention_layer']}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point of the scripts in bench/: JSON on stdout unless --table."""
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    table = "--table" in argv
    argv = [a for a in argv if a != "--table"]
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run(args)
    print(summary(report) if table else json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
