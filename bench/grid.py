"""The anchor shape in every weight format and batch size, in one run, with the issue's decode
targets judged on ratios of that run.

Variants: for each kernels choice (`--kernels`: the compiled kernels, "auto", and/or pure XLA,
"xla") and weight format (`--weights`), a decode at each batch size (`--batch`; decode.py's
method: the same prompt of `--prompt-len` ids in every row, `--new-tokens` greedy tokens,
stamped by the public streaming callback) and a prefill at each prompt length
(`--prefill-lens`, batch 1, one new token: the call to the first token, reported as prompt
tokens per second). Every variant runs `--warmup` times first (its programs compile), then
`--iterations` rounds run each variant once, the order rotated by one each round, so that a
change of machine load falls on every variant alike and none always follows the same one.

Judged from the medians of the report (never asserted), per kernels choice and format: the
batch-1 step within 1.2x of its floor (the bytes a step reads in that format over the read
bandwidth measured before and after the rounds, bandwidth.py) and the step at the largest batch
within 1.5x of the step at batch 1 (decoding reads every weight once per step whatever the
batch). Beside the second, its physical check: a step at batch B multiplies B rows by every
weight, so it takes at least B * macs_per_row multiply-adds at the peak of the instruction its
products run on (`kernels.peak_macs`, measured once before the rounds): the compute floor. Its
larger of the two floors over the measured batch-1 step is the least ratio this machine allows.
With two kernels choices, each latency of the second over the first's.

`python -m bench.grid [options]` (or `slimllm bench grid`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from slimllm import kernels
from slimllm.kernels.linear import batched_instruction
from slimllm.reference.errors import OptionError
from slimllm.reference.weight_format import weight_bytes, weight_format

from .bandwidth import combine_bandwidth, measure_bandwidth
from .common import build_model, bytes_read_per_token, kv_bytes_read, log, macs_per_row, r3, stats
from .decode import decode_once, floor, format_group, in_format, ratio, runtime
from .targets import target

FLOOR_RATIO = 1.2  # the batch-1 step over its bandwidth floor
BATCH_RATIO = 1.5  # the step at the largest batch over the step at batch 1
ONE_TOKEN = argparse.Namespace(new_tokens=1)  # what decode_once reads of a prefill's options


def check(args, max_len: int) -> None:
    if args.backend != "jax" or args.compare:
        raise OptionError("grid times the jax backend only (no --backend numpy, no --compare)")
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise OptionError("need --prompt-len >= 1 and --new-tokens >= 2")
    if args.prompt_len + args.new_tokens > max_len:
        raise OptionError(f"--prompt-len + --new-tokens exceeds the model's context {max_len}")
    if max(args.prefill_lens) + 1 > max_len:
        raise OptionError(f"a --prefill-lens length + 1 exceeds the model's context {max_len}")


def rounds(calls: dict, n: int, what: str) -> dict:
    """`n` results of each call, one of each per round, the order rotated by one each round."""
    names = list(calls)
    out = {name: [] for name in names}
    for i in range(n):
        log(f"grid: {what} {i + 1} of {n}, {len(names)} variants")
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(calls[name]())
    return out


def run(args) -> dict:
    """Every (kernels, format, batch) decode and (kernels, format, length) prefill, interleaved."""
    model, info = build_model(args)
    cfg = model.cfg
    check(args, cfg.max_len)
    names, choices = list(args.weights), list(args.kernels)
    groups = {name: format_group(name, args.weight_group) for name in names}
    samples = []
    if args.bandwidth_mib > 0:
        samples.append(measure_bandwidth(args.bandwidth_mib, "before"))
    models = {}
    for name in names:  # every format from the loaded weights, before any is dropped
        log(f"weights as {name}" + (f", groups of {groups[name]}" if groups[name] else ""))
        models[name] = in_format(model, name, groups[name])
    step_bytes = {n: bytes_read_per_token(m.params, cfg, 1) for n, m in models.items()}
    macs = macs_per_row(model.params, cfg)
    stored = {n: weight_bytes(m.params) for n, m in models.items()}
    rts = {(k, n): runtime(args, "jax", n, groups[n], k) for k in choices for n in names}
    for name in names:  # one engine (device weights) per format serves every kernels choice
        models[name].engine(rts[(choices[0], name)])
    model.params = None  # the engines hold their own copies
    for m in models.values():
        m.params = None

    peaks = {ins: kernels.peak_macs(ins) for ins in kernels.PEAK_INSTRUCTIONS}
    shown_peaks = (f"{i} {'-' if p is None else round(p / 1e9, 1)}" for i, p in peaks.items())
    log("multiply-add peaks, GMAC/s: " + ", ".join(shown_peaks))

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab, args.prompt_len).tolist()
    long_prompts = {n: rng.integers(0, cfg.vocab, n).tolist() for n in args.prefill_lens}

    def decode_call(k, name, batch):
        return lambda: decode_once(models[name], rts[(k, name)], [prompt] * batch, args)

    def prefill_call(k, name, length):
        return lambda: decode_once(models[name], rts[(k, name)], [long_prompts[length]], ONE_TOKEN)

    calls = {}
    for k in choices:
        for name in names:
            calls |= {("decode", k, name, b): decode_call(k, name, b) for b in args.batch}
            calls |= {("prefill", k, name, n): prefill_call(k, name, n) for n in args.prefill_lens}
    warm = rounds(calls, args.warmup, "warm-up round")
    runs = rounds(calls, args.iterations, "round")
    if args.bandwidth_mib > 0:
        samples.append(measure_bandwidth(args.bandwidth_mib, "after"))
    bandwidth = combine_bandwidth(samples)

    done = {v: (warm[v], runs[v]) for v in calls}
    context = args.prompt_len + args.new_tokens // 2  # mean context of the timed steps
    kv = kv_bytes_read(cfg, 1, context, args.kv_dtype)
    results = {}
    for k in choices:
        results[k] = {}
        for name in names:
            f = {
                "weight_group": groups[name],
                "weight_bytes": stored[name],
                "floor": floor(name, step_bytes[name], kv, context, bandwidth),
                "compute_floor": compute_floor(name, groups[name], k, macs, peaks, args.batch),
                "decode": {
                    str(b): decode_report(*done[("decode", k, name, b)], b) for b in args.batch
                },
                "prefill": {
                    str(n): prefill_report(*done[("prefill", k, name, n)], n)
                    for n in args.prefill_lens
                },
            }
            results[k][name] = f | judged(f, args.batch)
    report = {
        "kind": "grid",
        "model": info,
        "settings": {
            "weights": names,
            "weight_group": args.weight_group,
            "batch": list(args.batch),
            "prefill_lens": list(args.prefill_lens),
            "kernels": choices,
            "kernels_isa": kernels.isa(),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "kv_dtype": args.kv_dtype,
            "attention": args.attention,
            "tp": args.tp,
            "iterations": args.iterations,
            "warmup": args.warmup,
        },
        "bandwidth": bandwidth,
        "results": results,
        "targets": targets(results),
    }
    if len(choices) > 1:
        report["kernels_compare"] = kernels_compare(results, choices)
    return report


def compute_floor(name: str, group, choice: str, macs: int, peaks: dict, batches) -> dict:
    """The least time the weight products of a step at each batch size take: its multiply-adds
    at the peak of the instruction that format's products of many rows run on (None where that
    instruction is not measured)."""
    enc = weight_format(name).matrices
    instruction = batched_instruction(enc.name, group or enc.group, choice)
    peak = peaks.get(instruction)
    return {
        "instruction": instruction,
        "macs_per_row": macs,
        "peak_macs_per_s": r3(peak) if peak else None,
        "ms": {str(b): r3(macs * b / peak * 1e3) if peak else None for b in batches},
    }


def compile_seconds(outs: list[dict]) -> float:
    return r3(sum(o["compile_seconds"] for o in outs))


def decode_report(warm: list[dict], runs: list[dict], batch: int) -> dict:
    """Latencies of one (kernels, format, batch) decode; tokens/s of all rows, first excluded."""
    nt = stats([t for r in runs for t in r["next_ms"]])
    return {
        "first_token_ms": stats([r["first_ms"] for r in runs]),
        "next_token_ms": nt,
        "tokens_per_s": r3(1000 / nt["p50"] * batch),
        "compile_seconds": compile_seconds(warm),
        "compile_seconds_while_timed": compile_seconds(runs),
    }


def prefill_report(warm: list[dict], runs: list[dict], length: int) -> dict:
    """The call to the first token of one prompt (its prefill and one sample), and tokens/s."""
    ms = stats([r["first_ms"] for r in runs])
    return {
        "ms": ms,
        "tokens_per_s": r3(length / ms["p50"] * 1000),
        "compile_seconds": compile_seconds(warm),
        "compile_seconds_while_timed": compile_seconds(runs),
    }


def judged(f: dict, batches) -> dict:
    """The two ratios the targets judge, from the reported medians (None when not measured)."""
    step = {b: f["decode"][str(b)]["next_token_ms"]["p50"] for b in batches}
    largest = max(batches)
    one = step.get(1)
    floors = [f["floor"]["ms"], f["compute_floor"]["ms"][str(largest)]]
    least = max(floors) if None not in floors else None
    return {
        "b1_over_floor": ratio(one, f["floor"]["ms"]),
        "step_ratio": {
            "batch": largest,
            "value": ratio(step[largest], one) if largest > 1 else None,
            "least_possible": ratio(least, one) if largest > 1 else None,
        },
    }


def targets(results: dict) -> list[dict]:
    out = []
    for k, formats in results.items():
        for name, f in formats.items():
            where = {"kernels": k, "weights": name}
            out.append(
                target(
                    f"{name} decode b1 within {FLOOR_RATIO}x of its floor",
                    f["b1_over_floor"],
                    "<=",
                    FLOOR_RATIO,
                )
                | where
            )
            s = f["step_ratio"]
            out.append(
                target(
                    f"{name} step b{s['batch']} within {BATCH_RATIO}x of b1",
                    s["value"],
                    "<=",
                    BATCH_RATIO,
                )
                | where
                | {"least_possible": s["least_possible"]}
            )
    return out


def kernels_compare(results: dict, choices: list[str]) -> dict:
    """Each latency (medians) with the second kernels choice over the first's: above 1, the
    first is faster."""
    base, other = results[choices[0]], results[choices[1]]
    out = {"base": choices[0], "other": choices[1], "formats": {}}
    for name, f in base.items():
        g = other[name]
        out["formats"][name] = {
            "next_token": {
                b: ratio(g["decode"][b]["next_token_ms"]["p50"], d["next_token_ms"]["p50"])
                for b, d in f["decode"].items()
            },
            "first_token": {
                b: ratio(g["decode"][b]["first_token_ms"]["p50"], d["first_token_ms"]["p50"])
                for b, d in f["decode"].items()
            },
            "prefill": {
                n: ratio(g["prefill"][n]["ms"]["p50"], p["ms"]["p50"])
                for n, p in f["prefill"].items()
            },
        }
    return out


def summary(r: dict) -> str:
    m, s = r["model"], r["settings"]
    bw = r["bandwidth"]
    lines = [
        f"grid: {m['source']}, {m['params'] / 1e6:.0f}M params, {m['layers']} layers; prompt "
        f"{s['prompt_len']}, {s['new_tokens']} new, {s['kv_dtype']} cache, {s['attention']}; "
        f"{s['iterations']} rounds; kernels {', '.join(s['kernels'])} (isa {s['kernels_isa']})",
        f"  bandwidth {bw['read_gbs']} GB/s read" if bw else "  bandwidth not measured",
        f"  {'kernels':7s} {'weights':9s} {'batch':>5s} {'next p50':>9s} {'p90':>8s} "
        f"{'first p50':>9s} {'tok/s':>8s} {'floor ms':>8s} {'compute floor ms':>16s}",
    ]
    for k, formats in r["results"].items():
        for name, f in formats.items():
            for b, d in f["decode"].items():
                nt = d["next_token_ms"]
                lines.append(
                    f"  {k:7s} {name:9s} {b:>5s} {nt['p50']:9.2f} {nt['p90']:8.2f} "
                    f"{d['first_token_ms']['p50']:9.1f} {d['tokens_per_s']:8.1f} "
                    f"{f['floor']['ms']!s:>8} {f['compute_floor']['ms'][b]!s:>16}"
                )
    lens = r["settings"]["prefill_lens"]
    lines.append(f"  prefill tokens/s   {'':9s} " + " ".join(f"{n:>8d}" for n in lens))
    for k, formats in r["results"].items():
        for name, f in formats.items():
            rates = " ".join(f"{f['prefill'][str(n)]['tokens_per_s']:8.1f}" for n in lens)
            lines.append(f"  {k:7s} {name:9s}   {'':9s}{rates}")
    lines.append("targets (medians):")
    for t in r["targets"]:
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        least = t.get("least_possible")
        lines.append(
            f"  {t['kernels']:7s} {t['name']:44s} {t['value']!s:>7} {t['op']} "
            f"{t['threshold']} {mark}" + (f" (least possible here {least})" if least else "")
        )
    if "kernels_compare" in r:
        c = r["kernels_compare"]
        lines.append(f"{c['other']} over {c['base']} (medians; above 1: {c['base']} is faster):")
        for name, x in c["formats"].items():
            steps = ", ".join(f"b{b} {v}x" for b, v in x["next_token"].items())
            pre = ", ".join(f"{n} {v}x" for n, v in x["prefill"].items())
            lines.append(f"  {name:9s} next token {steps}; prefill {pre}")
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["grid", *sys.argv[1:]]))
