"""Benchmarks with JSON output: decode latency the way xFasterTransformer measures it, three
micro-benchmarks, the machine's memory bandwidth with the floor it sets, and a real-size check.

The entry point of `slimllm bench` (slimllm/cli.py parses the options, then calls `run` and
`summary`) and of the scripts in this folder (`main`, JSON on stdout unless --table). `run`
wraps a benchmark's report with what every report carries: schema, machine, peak memory, time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from slimllm.reference.errors import OptionError
from slimllm.strict_json import dumps

from . import (
    attention,
    bandwidth,
    compile_time,
    decode,
    grid,
    kv_decode,
    products,
    realsize,
    serve,
    targets,
)
from .common import add_arguments, fill_defaults, peak_rss_bytes, r3

SCHEMA = "slimllm.bench/1"
BENCHMARKS = {  # the kinds of common.KINDS
    "decode": decode,
    "attention": attention,
    "kv-decode": kv_decode,
    "products": products,
    "bandwidth": bandwidth,
    "targets": targets,
    "realsize": realsize,
    "compile": compile_time,
    "grid": grid,
    "serve": serve,
}


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jax_devices": jax.device_count(),
    }


def run(args) -> dict:
    """Run the benchmark `args.kind` and return its JSON report."""
    fill_defaults(args)
    if args.iterations < 1 or args.warmup < 0 or args.runs < 1:
        raise OptionError("need --iterations >= 1, --warmup >= 0 and --runs >= 1")
    t0 = time.perf_counter()
    report = BENCHMARKS[args.kind].run(args)
    report = {
        "schema": SCHEMA,
        **report,
        "machine": machine(),
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds": r3(time.perf_counter() - t0),
    }
    if args.out:
        Path(args.out).write_text(dumps(report, indent=1) + "\n")
    return report


def summary(report: dict) -> str:
    """A short table of the report's headline numbers."""
    return "\n".join(
        [
            BENCHMARKS[report["kind"]].summary(report),
            f"peak RSS {report['peak_rss_bytes'] / 2**20:,.0f} MiB, {report['seconds']} s",
        ]
    )


def main(argv=None) -> int:
    """Entry point of the scripts in bench/: JSON on stdout unless --table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    table = "--table" in argv
    argv = [a for a in argv if a != "--table"]
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run(args)
    print(summary(report) if table else dumps(report, indent=1))
    return 0
