"""The machine's memory bandwidth, which sets the decode floor.

Single-row decode reads every weight once per token, so it is bound by memory bandwidth: the
floor is `weight bytes read per token / read bandwidth`. The read bandwidth is a jitted XLA
reduction over a large float32 array (bytes read); a NumPy copy (bytes read + written) is
reported beside it for comparison. Best of 5 runs.

`python -m bench.bandwidth [options]` (or `slimllm bench bandwidth`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .common import log, r3, timed


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
    x = jnp.ones(n, jnp.float32)
    reduce = jax.jit(jnp.sum)
    reduce(x).block_until_ready()
    return timed(lambda: reduce(x).block_until_ready(), runs)


def measure_bandwidth(mib: int, when: str) -> dict:
    """`memory_bandwidth`, in a child process for large arrays so that they never count in this
    process's peak memory (small ones, as in tests, run here: a child costs a JAX import)."""
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


def run(args) -> dict:
    """In this process (measure_bandwidth runs this as its child for large arrays)."""
    return {"kind": "bandwidth", "bandwidth": memory_bandwidth(max(args.bandwidth_mib, 1))}


def summary(report: dict) -> str:
    """One line for `report["bandwidth"]` (of this report, or of the targets report)."""
    bw = report["bandwidth"]
    if not bw:
        return "bandwidth: not measured"
    return (
        f"bandwidth: XLA reduce {bw['xla_reduce_read_gbs']} GB/s read, "
        f"NumPy copy {bw['numpy_copy_gbs']} GB/s read+write ({bw['bytes'] / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["bandwidth", *sys.argv[1:]]))
