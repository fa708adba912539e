"""Every measurement the benchmark issue sets a target for, in one run, judged (never asserted):
150M decode at batch 1 within 1.3x of the bandwidth floor and at least 1.5x faster than the
NumPy reference; SlimAttention prefill at most 0.5x flash; the int8 KV decode step faster than
float32. The bandwidth is measured first and shared by decode and kv-decode.

`python -m bench.targets [options]` (or `slimllm bench targets`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import argparse
import sys

from . import attention, bandwidth, decode, kv_decode


def run(args) -> dict:
    """Bandwidth, then the three measurements the issue sets targets for, judged (not asserted)."""
    bw = bandwidth.measure_bandwidth(max(args.bandwidth_mib, 1), "before")
    base = dict(vars(args))
    dec = decode.run(argparse.Namespace(**base | {"compare": True}), bw)
    bw = dec["bandwidth"]  # before and after the decode runs
    kinds = ("naive", "slim", "flash")
    attn = attention.run(argparse.Namespace(**base | {"batch": 1, "kinds": kinds}))
    kv = kv_decode.run(argparse.Namespace(**base | {"kv_dtypes": ("float32", "int8")}), bw)
    jax_next, compare = dec["backends"]["jax"], dec["compare"]
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
        "decode": dec,
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


def summary(r: dict) -> str:
    lines = [
        bandwidth.summary(r),
        decode.summary(r["decode"]),
        attention.summary(r["attention"]),
        kv_decode.summary(r["kv_decode"]),
        "targets (mean; median in brackets):",
    ]
    for t in r["targets"]:
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        p50 = f"[{t['value_p50']}]" if "value_p50" in t else ""
        lines.append(
            f"  {t['name']:44s} {t['value']!s:>7} {p50:>8} {t['op']:2s} {t['threshold']:<4} {mark}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["targets", *sys.argv[1:]]))
