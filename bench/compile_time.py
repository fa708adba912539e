"""Compile time: a fresh process's first token with an empty compile cache, then a second
process's with the cache the first one filled.

Each run is a child process (`python -c`, this module's `child`) with its own
$SLIMLLM_COMPILE_CACHE, a temporary directory both share: the model of `--preset`/`--config`/
`--model`, one streamed generation of `--new-tokens` from a prompt of `--prompt-len` random ids
(greedy, streamed). It reports, from the start of the process: the imports, the model (random
weights or a checkpoint load), and the first token of the generation (from the call:
its programs compiled or read from the cache, prefill, first sample; the weights are placed on
the device before), the same generation's first token again in that process (every program in
memory: the floor) and their difference, the compile overhead; with the programs it compiled,
the ones it read from the disk cache, and their seconds.

`slimllm bench compile` (or `python -m bench.compile_time`); the JSON fields: bench/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slimllm.reference.errors import OptionError

from .common import log, r3

SETTINGS = ("preset", "config", "model", "layers", "prompt_len", "new_tokens", "batch")
SETTINGS += ("kv_dtype", "attention")


def child(settings: dict) -> dict:
    """One process's first token (the child's work; `started` is its first instant)."""
    started = time.perf_counter()
    import argparse

    import numpy as np

    from slimllm.api import generate
    from slimllm.jaxbackend import engine as jax_engine
    from slimllm.reference.runtime import Runtime

    from .common import build_model

    imported = time.perf_counter()
    model, info = build_model(argparse.Namespace(**settings))
    built = time.perf_counter()
    prompt = np.random.default_rng(0).integers(0, model.cfg.vocab, settings["prompt_len"])
    rt = Runtime(attention=settings["attention"], kv_dtype=settings["kv_dtype"])
    engine = model.engine(rt)  # the weights placed on the device: no compiling
    placed = time.perf_counter()

    def first_token():
        stamps = []
        call = time.perf_counter()
        out = generate(
            model,
            ids=[prompt.tolist()] * settings["batch"],
            max_new_tokens=settings["new_tokens"],
            eos_ids=(),
            on_token=lambda row, token: stamps.append(time.perf_counter()),
            runtime=rt,
            mode="stream",
        )
        return stamps[0] - call, stamps[0], out

    first, stamp, out = first_token()
    again = first_token()[0]  # every program in memory: the floor of the first token
    return {
        "import_seconds": r3(imported - started),
        "model_seconds": r3(built - imported),
        "engine_seconds": r3(placed - built),
        "first_token_seconds": r3(first),
        "process_first_token_seconds": r3(stamp - started),
        "again_first_token_seconds": r3(again),
        "compile_overhead_seconds": r3(first - again),
        "compile_seconds": r3(out.compile_seconds),
        "programs": len(engine.programs),
        "compiled": engine.compiled,
        "read_from_cache": len(engine.programs) - engine.compiled,
        "disk_cache": {"hits": jax_engine.DISK["hits"], "misses": jax_engine.DISK["misses"]},
        "model": {k: info[k] for k in ("source", "params", "layers")},
    }


def spawn(settings: dict, cache: Path) -> dict:
    """`child` in a new Python process whose compile cache is `cache`."""
    root = str(Path(__file__).resolve().parents[1])  # where this slimllm's packages are found
    env = os.environ | {
        "SLIMLLM_COMPILE_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
    }
    code = (
        "import json, sys; from slimllm.bench.compile_time import child; "
        "print(json.dumps(child(json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
    )
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise OptionError(f"the compile benchmark's child failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run(args) -> dict:
    """Cold then warm: two processes, one compile cache (a new temporary directory)."""
    if args.tp != 1 or args.backend != "jax":
        raise OptionError("bench compile measures the jax backend on one device (--tp 1)")
    settings = {name: getattr(args, name) for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="slimllm-compile-") as cache:
        log("cold: a fresh process, an empty compile cache")
        cold = spawn(settings, Path(cache))
        log("warm: a second process, the same cache")
        warm = spawn(settings, Path(cache))
        entries = len(os.listdir(cache))
    ratio = cold["compile_overhead_seconds"] / max(warm["compile_overhead_seconds"], 1e-3)
    return {
        "kind": "compile",
        "model": cold.pop("model"),
        "settings": settings,
        "cold": cold,
        "warm": {k: v for k, v in warm.items() if k != "model"},
        "cache_entries": entries,
        "overhead_cold_over_warm": r3(ratio),
    }


def summary(r: dict) -> str:
    m, s = r["model"], r["settings"]
    lines = [
        f"compile: {m['source']}, {m['params'] / 1e6:.0f}M params; batch {s['batch']}, "
        f"prompt {s['prompt_len']}, {s['new_tokens']} new ({r['cache_entries']} cache entries)",
        f"  {'process':8s} {'import s':>8s} {'model s':>8s} {'engine s':>8s} "
        f"{'first tok s':>11s} {'again s':>8s} {'overhead s':>10s} {'compiled':>8s} "
        f"{'from cache':>10s} {'compile s':>9s}",
    ]
    for name in ("cold", "warm"):
        p = r[name]
        lines.append(
            f"  {name:8s} {p['import_seconds']:8.2f} {p['model_seconds']:8.2f} "
            f"{p['engine_seconds']:8.2f} {p['first_token_seconds']:11.3f} "
            f"{p['again_first_token_seconds']:8.3f} {p['compile_overhead_seconds']:10.3f} "
            f"{p['compiled']:8d} {p['read_from_cache']:10d} {p['compile_seconds']:9.3f}"
        )
    lines.append(
        f"  compile overhead of the first token, cold / warm: {r['overhead_cold_over_warm']}x"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["compile", *sys.argv[1:]]))
