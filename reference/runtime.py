"""How a model runs, as one value: the run settings that are never part of the model config.

`ModelConfig` says what a model is; `Runtime` says how this run computes it: which backend,
which attention kind (all tested equal to the naive definition), how the KV cache is stored (an
entry of `kv_cache.KV_FORMATS`), over how many tensor-parallel ranks and which transport, how
long a cache to allocate, how the weights are stored (an entry of
`weight_format.WEIGHT_FORMATS`, with the quantisation group size), and whether the JAX backend
calls slimllm's compiled kernels (`slimllm.kernels`) or stays in pure XLA. It is frozen and
hashable, validated here and nowhere else (a bad value is an `OptionError` that names it), and
passed as one static argument under jit.

The attention kinds are a table per backend (`ATTENTION` here and in `jaxbackend/runtime.py`),
with the same names; `attention_fn(rt)` is the one lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass

from .attention import naive_attention
from .errors import OptionError
from .flash_attention import flash_attention
from .kv_cache import KV_FORMATS
from .slim_attention import slim_attention
from .weight_format import WEIGHT_DTYPES, WEIGHT_FORMATS

ATTENTION = {"naive": naive_attention, "slim": slim_attention, "flash": flash_attention}
BACKENDS = ("jax", "numpy")  # jax: the compiled fast path; numpy: the reference
TRANSPORTS = ("devices", "mpi")  # tensor parallelism over XLA devices or MPI processes
# jax backend: "auto" calls the compiled kernels where the library loaded (float32 arithmetic,
# the reference's up to the order of sums), "fast" also lets weight products round x: on a CPU
# with AMX, bfloat16/int8/int4 products of more than 4 rows (batched decode, prefill) take x
# rounded to bfloat16 or to int8 per 32/64 columns in AMX tiles (int4 against more than 16 rows:
# its values widened to bfloat16, x to bfloat16); without AMX but with AVX512-BF16 (Zen 4) the
# same products take x rounded to bfloat16 (bfloat16 weights, codes widened to bfloat16) or to
# int8 (int8 codes, int4 codes in groups of 32) in dot-product instructions, and bfloat16
# weights, stored in pair order for it, at every batch size (decode's too); otherwise int8
# products round x to 16-bit integers and int4 products to int8 per 32 columns (bounds in
# kernels/src/linear.cc); "xla" never calls them
KERNELS = ("auto", "fast", "xla")


@dataclass(frozen=True)
class Runtime:
    """The run settings (module docstring): `backend` ("jax" or "numpy"), `attention` (an
    ATTENTION kind, with its block or tile sizes in `attention_options`), `kv_dtype` (a
    KV_FORMATS name), `tp` ranks over `transport` ("devices": XLA devices of this process,
    "mpi": one MPI process each), `cache_len` (KV slots; None: prompt + new tokens), `weights`
    and `weight_group` (a WEIGHT_FORMATS name and its input columns per scale; None: as loaded,
    the format's default), `kernels` (a KERNELS choice). Every field is checked when made."""

    backend: str = "jax"
    attention: str = "naive"  # an ATTENTION kind
    attention_options: tuple = ()  # (name, value) pairs: block/tile sizes of that kind
    kv_dtype: str = "float32"  # a KV_FORMATS name (the format of the KV cache)
    tp: int = 1  # tensor-parallel ranks
    transport: str = "devices"
    cache_len: int | None = None  # KV slots to allocate (None: prompt + new tokens)
    weights: str | None = None  # a WEIGHT_FORMATS name (None: the checkpoint's own dtype)
    weight_group: int | None = None  # input columns per scale (None: the format's default)
    kernels: str = "auto"  # a KERNELS choice (the NumPy reference has none)

    def __post_init__(self):
        for what, value, allowed in (
            ("backend", self.backend, BACKENDS),
            ("attention", self.attention, tuple(ATTENTION)),
            ("kv cache dtype", self.kv_dtype, tuple(KV_FORMATS)),
            ("transport", self.transport, TRANSPORTS),
            ("kernels choice", self.kernels, KERNELS),
        ):
            if not isinstance(value, str) or value not in allowed:
                raise OptionError(f"unknown {what} {value!r}: expected one of {allowed}")
        if not isinstance(self.tp, int) or isinstance(self.tp, bool) or self.tp < 1:
            raise OptionError(f"tp must be an integer >= 1, got {self.tp!r}")
        if self.tp > 1 and self.backend != "jax":
            raise OptionError("tensor parallelism (tp > 1) needs the jax backend")
        n = self.cache_len
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise OptionError(f"cache_len must be a positive integer, got {self.cache_len!r}")
        known = isinstance(self.weights, str) and self.weights in WEIGHT_DTYPES
        if self.weights is not None and not known:
            raise OptionError(
                f"unknown weight format {self.weights!r}: expected one of {tuple(WEIGHT_FORMATS)}"
            )
        g = self.weight_group
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise OptionError(f"weight_group must be a positive integer, got {g!r}")
        if g is not None and not (self.weights and WEIGHT_FORMATS[self.weights].scaled):
            scaled = tuple(name for name, fmt in WEIGHT_FORMATS.items() if fmt.scaled)
            raise OptionError(
                f"a weight group needs a quantised weight format (one of {scaled}): it would "
                "be ignored"
            )

    def replace(self, **changes) -> Runtime:
        """A copy with `changes`, checked as any new Runtime."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short label: backend:attention:kv[:tpN] (the syntax `slimllm diff` parses)."""
        tp = f":tp{self.tp}" if self.tp > 1 else ""
        weights = f":w{self.weights}" if self.weights else ""
        group = f":g{self.weight_group}" if self.weight_group else ""
        return f"{self.backend}:{self.attention}:{self.kv_dtype}{tp}{weights}{group}"


def attention_fn(rt: Runtime, table: dict = ATTENTION):
    """The attention function of `rt` from a backend's table, with the options it takes (an
    option one backend's kind lacks is the other's: JAX computes naive attention in key blocks,
    `key_block`, while the reference's naive attention is the literal definition)."""
    fn = table[rt.attention]
    options = {name: value for name, value in rt.attention_options if name in parameters(fn)}
    return functools.partial(fn, **options) if options else fn


@functools.cache
def parameters(fn) -> frozenset[str]:
    """The names a function takes (cached: attention_fn runs once per layer per forward)."""
    return frozenset(inspect.signature(fn).parameters)
