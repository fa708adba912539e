"""The weight products alone, JAX backend: `ops.linear` over a set of weight matrices in each
weight format and at several batch sizes (the measurements jaxbackend/weight_format.py quotes).

A shape set (`--shapes`) lists matrices [out, in] as the device stores them (q/k/v fused, gate/up
fused: `jaxbackend/params.py`): the 150M preset's eight layers and LM head (33 matrices, all the
weights a decode step multiplies by), one Llama-3-8B layer, or the tiny preset's. Each matrix is
random N(0, 1/in) float32, encoded in every format of `--weights` as a projection
(`encode("w_up", ...)`, so int4 covers the LM head too, where a model in int4 keeps it int8) and
placed as the device stores it. For each (format, batch) one program multiplies x [batch, in] by
every matrix and sums each product whole (every product stays live), jitted ahead of time; the
programs' timed runs are interleaved, one of each per round, so a change of machine load falls
on all alike. Reported: the median, the bytes stored (scales included), those bytes per second,
and the ratio to the first format (float32 by default) at the same batch.

`--tile-rows` / `--transposed-cols` set `TILE_ROWS` / `TRANSPOSED_TILE_COLS` of
jaxbackend/weight_format.py while the programs are traced (`compact_linear` reads them then),
and restore them after: experiments with the tiling without editing the backend.

`python -m bench.products [options]` (or `slimllm bench products`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np

from slimllm import kernels
from slimllm.jaxbackend import ops, weight_format
from slimllm.jaxbackend.params import device_array
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.weight_format import encode
from slimllm.reference.weight_format import weight_format as format_named

from .common import SHAPE_SETS, interleaved, log, r3, resolve_config, timing


def device_matrices(cfg: ModelConfig, whole_model: bool) -> list[tuple[int, int]]:
    """[out, in] of one layer's products as the device stores them (whole_model: every layer's,
    then the LM head's): qkv [(h + 2k) d, e], wo [e, h d], gate/up [2f, e] (swiglu), down [e, f]."""
    e, f = cfg.width, cfg.ffn_width
    hd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    up = 2 * f if cfg.mlp == "swiglu" else f  # gate and up fused
    layer = [(hd + 2 * kd, e), (e, hd), (up, e), (e, f)]
    return layer * cfg.n_layers + [(cfg.vocab, e)] if whole_model else layer


def shape_set(name: str) -> list[tuple[int, int]]:
    """The matrices [out, in] of the shape set `name` (common.SHAPE_SETS)."""
    preset, scope = SHAPE_SETS[name]
    cfg, _ = resolve_config(preset, None, None)
    return device_matrices(cfg, scope == "model")


def format_group(name: str, group: int | None) -> int | None:
    """The columns per scale a format's matrices get (None: float, or one scale per row)."""
    enc = format_named(name).matrices
    return (enc.group if group is None else group) if enc.scaled else None


def device_weights(shapes, names, group: int | None, seed: int = 0):
    """Per format, every matrix of `shapes` as the device stores it, all from the same random
    float32 matrices (one on the host at a time), and the bytes each format stores."""
    weights, stored = {name: [] for name in names}, dict.fromkeys(names, 0)
    for i, (rows, cols) in enumerate(shapes):
        rng = np.random.default_rng([seed, i])
        w = rng.standard_normal((cols, rows), np.float32) / np.float32(np.sqrt(cols))  # [in, out]
        for name in names:
            host = encode("w_up", w, format_named(name), group)  # [in, out] -> stored [out, in]
            stored[name] += int(host.nbytes)
            weights[name].append(device_array("w_up", host))
    return weights, stored


@contextmanager
def tiling(tile_rows: int | None, transposed_cols: int | None):
    """jaxbackend/weight_format.py's TILE_ROWS and TRANSPOSED_TILE_COLS set to these (None: kept)
    while the block traces programs, restored after; yields the values in effect."""
    saved = weight_format.TILE_ROWS, weight_format.TRANSPOSED_TILE_COLS
    if tile_rows is not None:
        weight_format.TILE_ROWS = tile_rows
    if transposed_cols is not None:
        weight_format.TRANSPOSED_TILE_COLS = transposed_cols
    try:
        yield weight_format.TILE_ROWS, weight_format.TRANSPOSED_TILE_COLS
    finally:
        weight_format.TILE_ROWS, weight_format.TRANSPOSED_TILE_COLS = saved


def compiled_products(shapes, xs: dict, weights: list, warmup: int, choice: str = "auto"):
    """The program summing every product x @ w.T, jitted ahead of time with this kernels choice
    -> (compile seconds, call). xs maps an input width to x [b, in]."""

    def products(xs, weights):
        total = jnp.float32(0)
        for (_, cols), w in zip(shapes, weights):
            total += jnp.sum(ops.linear(xs[cols], w))  # [b,in] -> [b,out] -> []
        return total

    t0 = time.perf_counter()
    with kernels.choose(choice):
        program = jax.jit(products).lower(xs, weights).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        program(xs, weights).block_until_ready()
    return compile_s, lambda: program(xs, weights).block_until_ready()


def run(args) -> dict:
    """Every (format, batch) program compiled, then their runs interleaved."""
    names, batches = args.weights, args.batch
    choice = args.kernels  # one choice (only grid takes a list)
    if args.tile_rows is not None and args.tile_rows < 1:
        raise OptionError(f"--tile-rows must be positive, got {args.tile_rows}")
    if args.transposed_cols is not None and args.transposed_cols < 0:
        raise OptionError(f"--transposed-cols must be >= 0, got {args.transposed_cols}")
    shapes = shape_set(args.shapes)
    log(f"products: {args.shapes}, {len(shapes)} matrices in {', '.join(names)}")
    weights, stored = device_weights(shapes, names, args.weight_group)
    rng = np.random.default_rng(1)
    widths = sorted({cols for _, cols in shapes})
    compiled, calls = {}, {}
    with tiling(args.tile_rows, args.transposed_cols) as (tile_rows, transposed_cols):
        for b in batches:
            xs = {c: jnp.asarray(rng.standard_normal((b, c), np.float32)) for c in widths}
            for name in names:
                log(f"products: compiling {name} at batch {b}")
                compiled[name, b], calls[name, b] = compiled_products(
                    shapes, xs, weights[name], args.warmup, choice
                )
    log(f"products: {args.runs} interleaved runs of {len(calls)} programs")
    ms = interleaved(calls, args.runs)
    base = names[0]
    formats = {}
    for name in names:
        per_batch = {}
        for b in batches:
            median = np.median(ms[name, b])
            per_batch[str(b)] = timing(compiled[name, b], ms[name, b]) | {
                "stored_gbs": r3(stored[name] / median / 1e6),
                "over_base": r3(median / np.median(ms[base, b])),
            }
        formats[name] = {
            "weight_group": format_group(name, args.weight_group),
            "stored_bytes": stored[name],
            "stored_mb": r3(stored[name] / 1e6),
            "batches": per_batch,
        }
    counts = Counter(shapes)
    return {
        "kind": "products",
        "what": "ops.linear over every matrix of the shape set, one jitted program per weight "
        "format and batch, median of interleaved runs",
        "shapes": {
            "name": args.shapes,
            "matrices": [{"out": r, "in": c, "count": n} for (r, c), n in counts.items()],
            "params": sum(r * c for r, c in shapes),
        },
        "tiling": {
            "tile_rows": tile_rows,
            "transposed_tile_cols": transposed_cols,
            "overridden": args.tile_rows is not None or args.transposed_cols is not None,
        },
        "batch": list(batches),
        "kernels": choice,
        "kernels_isa": kernels.isa(),
        "runs": args.runs,
        "base": base,
        "formats": formats,
    }


def summary(r: dict) -> str:
    sh, tl = r["shapes"], r["tiling"]
    lines = [
        f"products: {sh['name']} ({sum(m['count'] for m in sh['matrices'])} matrices, "
        f"{sh['params'] / 1e6:.1f}M weights), tiles of {tl['tile_rows']} rows, transposed up to "
        f"{tl['transposed_tile_cols']} columns, median of {r['runs']}; ratios to {r['base']}",
        f"  {'format':9s} {'MB':>8s}" + "".join(f"   {f'batch {b}':>29s}" for b in r["batch"]),
    ]
    for name, f in r["formats"].items():
        cells = [
            f"{x['median_ms']:8.2f} ms {x['stored_gbs']:5.1f} GB/s {x['over_base']:5.2f}x"
            for x in f["batches"].values()
        ]
        lines.append(f"  {name:9s} {f['stored_mb']:8.1f}   " + "   ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["products", *sys.argv[1:]]))
