"""Progress bars for long work (loading shards, evaluations), on stderr so that `--json` output
on stdout stays one clean object. Shown on a terminal; SLIMLLM_PROGRESS=1 forces them on,
SLIMLLM_PROGRESS=0 off."""

from __future__ import annotations

import os
import sys


def bar(iterable, desc: str, total: int | None = None):
    from tqdm import tqdm  # here: its import (~50 ms) would slow every `import slimllm`

    forced = os.environ.get("SLIMLLM_PROGRESS")
    disable = None if forced is None else forced == "0"  # None: only on a terminal
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        file=sys.stderr,
        disable=disable,
        leave=False,
        dynamic_ncols=True,
    )


def shards(files):
    """Progress over checkpoint files, shown only when there is more than one."""
    return bar(files, "loading shards") if len(files) > 1 else files
