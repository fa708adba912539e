"""The Engine: one model on the device(s), with its compiled programs, reused across calls.

It owns what does not change from call to call: the device weights (in the device layout, split
over tensor-parallel ranks by `sharding.ShardPlan` when tp > 1), the rank's `Comm`, and a cache
of programs compiled ahead of time per (function, static settings, argument shapes), with their
compile time kept apart from run time. `run` places arguments as `sharding.LAYOUTS` says, wraps
a program in `shard_map` over the device mesh when the ranks are this process's devices, and
donates what it is told to (the KV cache). Generation (`generate.py`) and teacher forcing or
tracing (`sequence.py`) are functions of an Engine.

`enable_compilation_cache(dir)` turns on JAX's persistent cache across processes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

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


def enable_compilation_cache(directory: str) -> None:
    """Persist compiled programs across processes (JAX's compilation cache)."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@dataclass
class Compiled:
    program: Callable
    seconds: float


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
        self.cfg = cfg  # the model's own config, never edited for a shard
        self.plan = ShardPlan.of(cfg, rt.tp)
        self.mesh = None
        if rt.tp == 1:
            self.comm, self.params = SINGLE, to_device(params, consume=consume)
        else:
            prepared = sharding.prepare(params, cfg, self.plan)
            self.comm = TRANSPORTS[rt.transport](rt.tp)
            if self.comm.per_process:
                if mpi.size() != rt.tp:
                    raise OptionError(f"tp={rt.tp} but the MPI job has {mpi.size()} ranks")
                self.params = to_device(sharding.local_slice(prepared, mpi.rank(), rt.tp))
            else:
                devices = jax.devices()
                if len(devices) < rt.tp:
                    raise OptionError(
                        f"tp={rt.tp} needs {rt.tp} XLA devices but this process has "
                        f"{len(devices)} (set XLA_FLAGS=--xla_force_host_platform_device_count="
                        f"{rt.tp} before jax is imported, or run under mpiexec)"
                    )
                self.mesh = jax.sharding.Mesh(np.array(devices[: rt.tp]), (tp.AXIS,))
                self.params = sharding.shard_params(prepared, self.mesh)
        self.programs: dict = {}
        self.compile_seconds = 0.0

    @property
    def kv_heads(self) -> int:
        """kv heads of the caches this process allocates (global arrays on a device mesh)."""
        per_rank = self.plan.kv_heads
        return per_rank if self.comm.per_process else per_rank * self.plan.tp

    def new_cache(self, batch: int, length: int, fmt: str):
        """An empty KV cache for this engine's ranks, placed where its programs expect it."""
        cache = kv_cache.init_cache(self.cfg, batch, length, fmt, kv_heads=self.kv_heads)
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
            program.lower(*args).compile()
            self.programs[key] = Compiled(program, time.perf_counter() - t0)
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


def gather_fn(logits, *, comm=SINGLE):
    """Full logits [b, v] from the ranks' slices (only when the caller asks for them)."""
    return tp.gather_vocab(logits, comm)


def program_runtime(rt: Runtime) -> Runtime:
    """The settings a compiled program depends on (the cache length is in the array shapes)."""
    return rt.replace(cache_len=None)
