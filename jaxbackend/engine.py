"""The Engine: one model on the device(s), with its compiled programs, reused across calls.

It owns what does not change from call to call: the device weights (in the device layout, split
over tensor-parallel ranks by `sharding.ShardPlan` when tp > 1), the rank's `Comm`, and a cache
of programs compiled ahead of time per (function, static settings, argument shapes), with their
compile time kept apart from run time. `run` places arguments as `sharding.LAYOUTS` says, wraps
a program in `shard_map` over the device mesh when the ranks are this process's devices, and
donates what it is told to (the KV cache). Generation (`generate.py`) and teacher forcing or
tracing (`sequence.py`) are functions of an Engine.

Compiled programs are also kept on disk across processes (JAX's persistent compilation cache),
so a second process on the same model and shapes loads them instead of compiling: in
$SLIMLLM_COMPILE_CACHE ("off" or "0": nowhere), else ${XDG_CACHE_HOME:-~/.cache}/slimllm/xla,
unless `compile_cache(directory)` chose first; the first Engine turns it on. A compile that runs
longer than `NOTICE_AFTER` seconds says so in one line on stderr.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from slimllm.kernels import linear as kernel
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.model import TRACE_KEYS
from slimllm.reference.params import Params

from . import kv_cache, mpi, sharding, tp
from .params import to_device
from .runtime import Runtime
from .sharding import LAYOUTS, ShardPlan
from .tp import SINGLE, TRANSPORTS

MIN_BUCKET = 16


def bucket(n: int) -> int:
    """Prompt lengths are padded to the next power of two (at least 16)."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


CACHE_ENV = "SLIMLLM_COMPILE_CACHE"
NOTICE_AFTER = 1.0  # seconds a compile runs before stderr says what is compiling (None: never)
DISK = {"directory": None, "chosen": False, "hits": 0, "misses": 0}  # this process's disk cache


def cache_dir_of(value: str) -> Path | None:
    """A directory named by $SLIMLLM_COMPILE_CACHE or --compile-cache ("off", "0": none)."""
    return None if value.strip().lower() in ("off", "0", "") else Path(value).expanduser()


def default_cache_dir() -> Path | None:
    """$SLIMLLM_COMPILE_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/slimllm/xla."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return cache_dir_of(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimllm" / "xla"


def compile_cache(directory: str | os.PathLike | None) -> Path | None:
    """Keep compiled programs in `directory` for later processes (None: nowhere), instead of
    the default place, from the next compile on. Returns the directory."""
    path = None if directory is None else Path(directory).expanduser()
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OptionError(
                f"compile cache {str(path)!r} cannot be made: {err.strerror}"
            ) from None
    if not DISK["chosen"]:
        jax.monitoring.register_event_listener(count_disk_event)
    # every program is worth keeping: a second process should compile nothing, not only the
    # programs that took over JAX's default second
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    compilation_cache.reset_cache()  # JAX reads the directory once, at its next compile
    DISK.update(directory=path, chosen=True)
    return path


def default_compile_cache() -> None:
    """The default cache, unless `compile_cache` chose already (the first Engine calls this);
    a default directory that cannot be made means no cache, not a failure."""
    if not DISK["chosen"]:
        try:
            compile_cache(default_cache_dir())
        except OptionError:
            compile_cache(None)


def count_disk_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        DISK["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        DISK["misses"] += 1


def notice(what: str) -> threading.Timer | None:
    """One line on stderr if the compile of `what` is still running after NOTICE_AFTER seconds
    (cancel the timer when it ends). SLIMLLM_PROGRESS=0 keeps it quiet, as the progress bars."""
    if NOTICE_AFTER is None or os.environ.get("SLIMLLM_PROGRESS") == "0":
        return None
    kept = "; cached for next time" if DISK["directory"] is not None else ""
    line = f"slimllm: compiling {what} (first use of these shapes{kept})"
    timer = threading.Timer(NOTICE_AFTER, lambda: print(line, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    return timer


def describe(fn, args, kinds) -> str:
    """The program and the shapes that made it new, e.g. "decode for batch 1, cache 256"."""
    name = fn.__name__.removesuffix("_fn")
    arrays = [a for a, k in zip(args, kinds) if k != "params" and hasattr(a, "shape")]
    caches = [a for a, k in zip(args, kinds) if k == "cache"]
    if caches:
        shape = jax.tree_util.tree_leaves(caches[0])[0].shape  # [b,k,s,d] (kv_cache.init_cache)
        return f"{name} for batch {shape[0]}, cache {shape[2]}"
    return f"{name} for batch {arrays[0].shape[0]}" if arrays and arrays[0].ndim else name


@dataclass
class Compiled:
    program: Callable
    seconds: float
    loaded: bool = False  # read from the disk cache, not compiled by this process


class Engine:
    """Weights of one model on this process's device(s) and its compiled programs.

    `rt.tp` > 1 splits the model over tensor-parallel ranks: `rt.transport == "devices"` uses
    tp XLA devices of this process (shard_map), "mpi" makes this process one of tp MPI ranks
    holding only its slice of the weights. The other settings of `rt` are per call. With
    `consume` (one device), the host `params` are emptied as they are placed (`to_device`).
    """

    def __init__(
        self, params: Params, cfg: ModelConfig, rt: Runtime = Runtime(), consume: bool = False
    ):
        default_compile_cache()
        self.cfg = cfg  # the model's own config, never edited for a shard
        self.plan = ShardPlan.of(cfg, rt.tp)
        self.mesh = None
        self.pairs = kernel.pair_order_wanted(rt.kernels)  # bfloat16 weights' layout (params.py)
        if rt.tp == 1:
            self.comm, self.params = SINGLE, to_device(params, consume=consume, pairs=self.pairs)
        else:
            prepared = sharding.prepare(params, cfg, self.plan)
            self.comm = TRANSPORTS[rt.transport](rt.tp)
            if self.comm.per_process:
                if mpi.size() != rt.tp:
                    raise OptionError(f"tp={rt.tp} but the MPI job has {mpi.size()} ranks")
                local = sharding.local_slice(prepared, mpi.rank(), rt.tp)
                self.params = to_device(local, pairs=self.pairs)
            else:
                devices = jax.devices()
                if len(devices) < rt.tp:
                    raise OptionError(
                        f"tp={rt.tp} needs {rt.tp} XLA devices but this process has "
                        f"{len(devices)} (set XLA_FLAGS=--xla_force_host_platform_device_count="
                        f"{rt.tp} before jax is imported, or run under mpiexec)"
                    )
                self.mesh = jax.sharding.Mesh(np.array(devices[: rt.tp]), (tp.AXIS,))
                self.params = sharding.shard_params(prepared, self.mesh, self.pairs)
        self.programs: dict = {}
        self.compile_seconds = 0.0
        self.loud = not self.comm.per_process or mpi.rank() == 0  # one notice per MPI job

    @property
    def compiled(self) -> int:
        """Programs this process compiled (not read from the disk cache)."""
        return sum(not c.loaded for c in self.programs.values())

    @property
    def kv_heads(self) -> int:
        """kv heads of the caches this process allocates (global arrays on a device mesh)."""
        per_rank = self.plan.kv_heads
        return per_rank if self.comm.per_process else per_rank * self.plan.tp

    def new_cache(self, batch: int, length: int, fmt: str):
        """An empty KV cache for this engine's ranks, placed where its programs expect it."""
        cache = empty_cache(self.cfg, batch, length, fmt, kv_heads=self.kv_heads)
        return self.place((cache,), ("cache",))[0]

    def trace_names(self) -> list[str]:
        names = []
        for key in TRACE_KEYS:
            if key == "final_norm" and not self.cfg.final_norm:
                continue
            names += [key.format(i=i) for i in range(self.cfg.n_layers)] if "{i}" in key else [key]
        return names

    def spec(self, kind: str, arg):
        names = self.trace_names() if kind == "trace" else ()  # place() runs on every call
        return sharding.layout(kind, arg, self.params, names)

    def place(self, args, kinds):
        """Put arguments where the compiled program expects them (no-op when already there)."""
        if self.mesh is None:
            return args
        out = []
        for arg, kind in zip(args, kinds, strict=True):
            if kind == "params":
                out.append(arg)
                continue
            out.append(
                jax.tree_util.tree_map(
                    lambda s, a: (
                        a
                        if s is None
                        else jax.device_put(a, jax.sharding.NamedSharding(self.mesh, s))
                    ),
                    self.spec(kind, arg),
                    arg,
                    is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec),
                )
            )
        return tuple(out)

    def run(self, fn, static: dict, donate: tuple, *args):
        """Run `fn` compiled ahead of time for these argument shapes (compiled once, cached)."""
        ins, outs = LAYOUTS[fn.__name__]
        args = self.place(args, ins)
        # the engine's weights never change shape: leave them out of the (per-token) key
        keyed = args[1:] if args and args[0] is self.params else args
        leaves, tree = jax.tree_util.tree_flatten(keyed)
        shapes = tuple((a.shape, a.dtype) if hasattr(a, "shape") else type(a) for a in leaves)
        key = (fn.__name__, tuple(sorted(static.items())), tree, shapes)
        if key not in self.programs:
            t0 = time.perf_counter()
            body = functools.partial(fn, **static, comm=self.comm)
            if self.mesh is not None:
                cache = next((a for a, k in zip(args, ins) if k == "cache"), None)
                out_specs = (
                    self.spec(outs, cache)
                    if isinstance(outs, str)
                    else tuple(self.spec(k, cache) for k in outs)
                )
                # check_vma=False: loops carry values that are per-rank by construction (local
                # heads) and replicated results come from collectives; the tests check equality.
                body = jax.shard_map(
                    body,
                    mesh=self.mesh,
                    check_vma=False,
                    in_specs=tuple(self.spec(k, a) for k, a in zip(ins, args)),
                    out_specs=out_specs,
                )
            # Compile ahead of time (to time it), but call through the jitted function: it reuses
            # that executable and, unlike a bare AOT executable, threads the runtime tokens of
            # ordered effects (mpi4jax collectives) from one call to the next.
            program = jax.jit(body, donate_argnums=donate)
            lowered = program.lower(*args)
            timer = notice(describe(fn, args, ins)) if self.loud else None
            hits = DISK["hits"]
            try:
                lowered.compile()
            finally:
                if timer is not None:
                    timer.cancel()
            loaded = DISK["hits"] > hits
            self.programs[key] = Compiled(program, time.perf_counter() - t0, loaded)
            self.compile_seconds += self.programs[key].seconds
        return self.programs[key].program(*args)

    def vocab_slice(self, a: np.ndarray) -> np.ndarray:
        """This process's columns of a host [b, v] array (all of them unless an MPI rank)."""
        if not self.comm.per_process:
            return a
        n = self.plan.vocab
        return a[..., self.comm.rank() * n : (self.comm.rank() + 1) * n]

    def full_logits(self, logits) -> np.ndarray:
        """Host copy of full logits from per-rank slices ([..., v/R] -> [..., v])."""
        if not self.comm.per_process:
            return np.asarray(logits)  # a sharded global array already has the full shape
        flat = logits.reshape(-1, logits.shape[-1])
        full = self.run(gather_fn, {}, (), flat)
        return np.asarray(full).reshape(*logits.shape[:-1], -1)


# All of a cache's zeroed leaves in one program: made one `jnp.zeros` at a time, the 16 leaves of
# the 150M preset's cache took 2.8 ms of dispatches before every prefill (the first token's
# time); one jitted call takes one dispatch.
empty_cache = jax.jit(kv_cache.init_cache, static_argnums=(0, 1, 2, 3), static_argnames="kv_heads")


def gather_fn(logits, *, comm=SINGLE):
    """Full logits [b, v] from the ranks' slices (only when the caller asks for them)."""
    return tp.gather_vocab(logits, comm)


def program_runtime(rt: Runtime) -> Runtime:
    """The settings a compiled program depends on (the cache length is in the array shapes)."""
    return rt.replace(cache_len=None)
