"""The tp=2 side of `test_tp_equivalence.py`: every case of `tp_cases.plan`, run in the background.

    python tp_worker.py FIXTURES OUTDIR               tp=2 on this process's two XLA devices
    mpiexec -n 2 python tp_worker.py FIXTURES OUTDIR  tp=2 across two processes (MPI ranks)

`Model.engine` picks the transport (MPI when launched by mpiexec). Results go to OUTDIR/{label}.npz
(label "devices", or "rank0"/"rank1"), keys "{case}:ids" and "{case}:logits". One invocation
loops over all cases because each process start, JAX import and compile costs seconds. Under MPI
any failure prints its traceback and aborts the whole job, so no rank is left waiting in a
collective and the test sees a non-zero exit at once.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import numpy as np
import tp_cases

from slimllm.jaxbackend import mpi


def main(fixtures: Path, outdir: Path) -> None:
    label = f"rank{mpi.rank()}" if mpi.launched_size() > 1 else "devices"
    results, t0 = {}, time.perf_counter()
    try:
        for case in tp_cases.plan(fixtures):
            for name, array in tp_cases.run(fixtures, case, tp=2).items():
                results[f"{case.key}:{name}"] = array
    except BaseException:  # noqa: BLE001 - under MPI any failure must end every rank
        print(f"tp_worker {label} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if mpi.launched_size() > 1:
            mpi.abort(1)
        raise
    np.savez(outdir / f"{label}.npz", **results)
    print(f"{label}: {len(results)} arrays in {time.perf_counter() - t0:.1f} s", flush=True)
    if mpi.launched_size() > 1:
        mpi.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
