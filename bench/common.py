"""What every benchmark shares: the model shapes (presets) and the model built from one, the
bytes a step must read, timing and statistics helpers, and the options of `slimllm bench`.

Nothing here imports jax: `slimllm` builds its parser from `add_arguments` before `--tp` has
set the number of XLA devices, which must happen before jax is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from slimllm.api import Model, load
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.kv_cache import KV_DTYPES, nbytes_per_token
from slimllm.reference.params import init_params
from slimllm.reference.runtime import ATTENTION, KERNELS
from slimllm.reference.weight_format import WEIGHT_FORMATS, weight_bytes
from slimllm.weights import load_config

# One module each (cli.BENCHMARKS).
KINDS = ("decode", "attention", "kv-decode", "products", "bandwidth", "targets", "realsize")
KINDS += ("compile", "grid", "serve")

# A ~150M-parameter Llama shape (the decode target; the anchors kit's 156M model in
# ../shared/anchors has the same shapes, with norm_eps 1e-6 and 2048 positions) and a tiny one
# for smoke tests.
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
# `products` shape sets: name -> (preset, "model": every layer and the LM head, "layer": one layer).
SHAPE_SETS = {
    "150m": ("150m", "model"),
    "llama-3-8b-layer": ("llama-3-8b", "layer"),
    "tiny": ("tiny", "model"),
}


def log(*parts) -> None:
    """Progress goes to stderr, so stdout stays one JSON object."""
    print("bench:", *parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models


def shared_dir() -> Path:
    beside_checkout = Path(__file__).resolve().parents[2] / "shared"
    return Path(os.environ.get("SLIMLLM_SHARED", beside_checkout))


def resolve_config(preset: str | None, config: str | None, layers: int | None):
    """The model config to benchmark and a description of where it came from."""
    if config:
        cfg, source = load_config(config), f"config:{config}"
    elif preset in PRESETS:
        cfg, source = PRESETS[preset], f"preset:{preset}"
    elif preset in REAL_PRESETS:
        path = shared_dir() / "configs" / preset / "config.json"
        if not path.exists():
            raise OptionError(f"preset {preset!r} reads {path}: not found (set SLIMLLM_SHARED)")
        cfg, source = load_config(path), f"preset:{preset}"
    else:
        raise OptionError(f"unknown preset {preset!r}: expected one of {(*PRESETS, *REAL_PRESETS)}")
    info = {"source": source, "layers": cfg.n_layers, "layers_overridden_from": None}
    if layers is not None and layers != cfg.n_layers:
        if layers < 1:
            raise OptionError(f"--layers must be positive, got {layers}")
        info |= {"layers": layers, "layers_overridden_from": cfg.n_layers}
        cfg = cfg.replace(n_layers=layers)
    return cfg, info


def build_model(args):
    """A random-weight model of the chosen shape, or a real checkpoint (--model)."""
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
        model = Model(cfg, init_params(cfg), family="random", source=info["source"])
    cfg = model.cfg
    info |= {
        "params": cfg.n_params(),
        "weight_bytes": weight_bytes(model.params),
        "init_seconds": r3(time.perf_counter() - t0),
        "config": dataclasses.asdict(cfg),  # nested values (rope scaling) as dicts
    }
    return model, info


def bytes_read_per_token(params, cfg: ModelConfig, batch: int) -> int:
    """Weight bytes one decode step must read, as stored (in any weight format, scales
    included): every weight except the embedding table, of which only the B looked-up rows
    are read (unless it doubles as the LM head). Every row of a table has the same bytes."""
    total = weight_bytes(params)
    if not cfg.tied_head:
        e = params.embed  # [v, e'], a plain array or a Compact
        total -= e.nbytes - batch * (e.nbytes // e.shape[0])
    return int(total)


def macs_per_row(params, cfg: ModelConfig) -> int:
    """Multiply-adds of one row of x through every weight product of a step: each matrix's
    elements, except the tables looked up rather than multiplied (the embedding, unless it
    doubles as the LM head, and learned positions)."""
    skip = {"pos_embed"} | (set() if cfg.tied_head else {"embed"})
    total = 0
    for obj in (params, *params.layers):
        for field in dataclasses.fields(obj):
            w = getattr(obj, field.name)
            if field.name in skip or field.name == "layers" or w is None or len(w.shape) != 2:
                continue
            total += int(np.prod(w.shape))
    return total


def kv_bytes_read(cfg: ModelConfig, batch: int, context: int, kv_dtype: str) -> int:
    """KV cache bytes attention reads at this context (values and int8 scales, all layers)."""
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


def timed(fn, runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls of fn (fn blocks until its result is ready)."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def interleaved(calls: dict, runs: int) -> dict:
    """Milliseconds of `runs` calls of each callable, taken in turns (one call of each per
    round), so that a change of machine load falls on every variant alike."""
    out = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            out[name] += timed(call, 1)
    return out


def timing(compile_s: float, ms: list[float]) -> dict:
    return {"compile_seconds": r3(compile_s), "median_ms": r3(np.median(ms)), "min_ms": r3(min(ms))}


# ---------------------------------------------------------------- options

# Options whose default depends on the benchmark: None in the parser, filled in by `fill_defaults`
# (realsize runs a full-size model, so its defaults are a real shape and a short generation;
# products times every weight format at several batch sizes; grid runs every variant of the
# anchor shape in each of few rounds, so that the default run takes minutes on two cores).
DEFAULTS = {
    "preset": "150m",
    "prompt_len": 128,
    "new_tokens": 32,
    "batch": (1,),
    "iterations": 10,
    "kernels": ("auto",),
}
KIND_DEFAULTS = {
    "realsize": {"preset": "llama-3-8b", "prompt_len": 16, "new_tokens": 8},
    "products": {"batch": (1, 4, 16), "weights": tuple(WEIGHT_FORMATS)},
    "serve": {"batch": (1, 4, 16), "iterations": 4, "new_tokens": 48},
    "grid": {
        "batch": (1, 4, 16),
        "weights": ("float32", "bfloat16", "int8", "int4"),
        "iterations": 3,
        "prefill_lens": (512, 2048),
    },
}
# Options that take a comma list for some kinds and one value for the others: option -> kinds.
LISTS = {"batch": frozenset({"products", "grid", "serve"}), "kernels": frozenset({"grid"})}


def fill_defaults(args) -> None:
    """Set the options left unset to the defaults of the benchmark `args.kind`; an option of
    LISTS is a tuple for its kinds, one value for the others."""
    for name, value in (DEFAULTS | KIND_DEFAULTS.get(args.kind, {})).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name, kinds in LISTS.items():
        value = getattr(args, name)
        if args.kind not in kinds and isinstance(value, tuple):
            if len(value) != 1:
                raise OptionError(f"--{name} takes one value for {args.kind}, got {value}")
            setattr(args, name, value[0])


def weight_formats(text: str) -> tuple[str, ...]:
    """`--weights float32,int8` -> ("float32", "int8"): WEIGHT_FORMATS names, each once."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in WEIGHT_FORMATS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct weight formats from {tuple(WEIGHT_FORMATS)}, comma separated; "
            f"got {text!r}"
        )
    return names


def batch_sizes(text: str) -> tuple[int, ...]:
    """`--batch 1,4,16` -> (1, 4, 16): positive sizes, each once (one size for most kinds)."""
    return sizes(text, "batch sizes")


def prompt_lengths(text: str) -> tuple[int, ...]:
    """`--prefill-lens 512,2048` -> (512, 2048): positive lengths, each once."""
    return sizes(text, "prompt lengths")


def sizes(text: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(size) for size in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(
            f"expected distinct positive {what}, comma separated; got {text!r}"
        )
    return out


def kernel_choices(text: str) -> tuple[str, ...]:
    """`--kernels auto,xla` -> ("auto", "xla"): Runtime.kernels choices, each once."""
    names = tuple(name.strip() for name in text.split(","))
    if any(name not in KERNELS for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct choices from {KERNELS}, comma separated; got {text!r}"
        )
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `slimllm bench` (and of the scripts in bench/)."""
    p.add_argument(
        "kind",
        nargs="?",
        choices=KINDS,
        default="decode",
        help="decode (default), attention / kv-decode / products micro-benchmarks, bandwidth, "
        "targets (all of the issue's measurements in one run), realsize, compile (a second "
        "process's first token with the compile cache the first one filled), grid (every "
        "weight format and batch size of the anchor shape, judged) or serve (slimllm serve "
        "under 1, 4 and 16 streaming clients)",
    )
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "--preset",
        choices=(*PRESETS, *REAL_PRESETS),
        help="model shape with random weights (default 150m; realsize: llama-3-8b)",
    )
    m.add_argument("--config", help="a config.json (random weights of that shape)")
    m.add_argument(
        "--model",
        help="a real checkpoint (directory or llama2.c .bin); realsize: one to measure, "
        "neither written nor deleted",
    )
    p.add_argument("--layers", type=int, help="override the layer count (reported)")
    p.add_argument("--backend", choices=("jax", "numpy"), default="jax")
    p.add_argument("--compare", action="store_true", help="run jax and numpy, report the ratio")
    p.add_argument(
        "--weights",
        type=weight_formats,
        help="weight format(s), comma separated, e.g. float32,bfloat16,int8 (decode: each timed "
        "in turn, ratios to the first; default the model's own; realsize: bfloat16,int8; "
        "products: all formats; grid: float32,bfloat16,int8,int4)",
    )
    p.add_argument(
        "--weight-group",
        type=int,
        help="int8/int4: input columns per scale (default: the format's own)",
    )
    p.add_argument(
        "--mode",
        choices=("stream", "loop"),
        default="stream",
        help="jax decode: per-token steps timed (stream) or the one-program loop",
    )
    p.add_argument(
        "--batch",
        type=batch_sizes,
        help="batch size (default 1); products, grid: a comma list (default 1,4,16); serve: "
        "concurrent clients, a comma list (default 1,4,16)",
    )
    p.add_argument(
        "--kernels",
        type=kernel_choices,
        help="jax: the compiled kernels where built (auto, default) or pure XLA (xla); grid: a "
        "comma list, each a variant (auto,xla shows the kernels' gain)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks (XLA devices here, or the mpiexec job's ranks)",
    )
    p.add_argument("--prompt-len", type=int, help="default 128 (realsize: 16)")
    p.add_argument("--new-tokens", type=int, help="default 32 (realsize: 8)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="float32")
    p.add_argument("--attention", choices=tuple(ATTENTION), default="naive")
    p.add_argument("--iterations", type=int, help="timed runs, default 10 (grid: 3 rounds)")
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
    w = p.add_argument_group("products")
    w.add_argument(
        "--shapes",
        choices=tuple(SHAPE_SETS),
        default="150m",
        help="products: the weight matrices (150m: every layer and the LM head; "
        "llama-3-8b-layer: one layer; tiny)",
    )
    w.add_argument(
        "--tile-rows",
        type=int,
        help="products: override jaxbackend.weight_format.TILE_ROWS (output rows per tile)",
    )
    w.add_argument(
        "--transposed-cols",
        type=int,
        help="products: override jaxbackend.weight_format.TRANSPOSED_TILE_COLS (widest tile "
        "transposed before its product)",
    )
    r = p.add_argument_group("realsize")
    r.add_argument("--dir", help="realsize: where to write the checkpoint (default: the temp dir)")
    r.add_argument("--keep", action="store_true", help="realsize: keep the written checkpoint")
    r.add_argument(
        "--shard-mb",
        type=float,
        default=5000,
        help="realsize: largest safetensors shard in MB (default 5000, the hub's 5GB)",
    )
    g = p.add_argument_group("grid")
    g.add_argument(
        "--prefill-lens",
        type=prompt_lengths,
        help="grid: prompt lengths of the prefill timings, comma separated (default 512,2048)",
    )
    s = p.add_argument_group("serve")
    s.add_argument("--url", help="serve: a running slimllm serve (default: start one on --model)")
    s.add_argument("--quick", action="store_true", help="serve: one short request per client")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--json", action="store_true", help="print the JSON report (else a table)")
