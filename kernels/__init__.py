"""slimllm's compiled CPU kernels, called from XLA programs through `jax.ffi`.

The C++ sources are `kernels/src/*.cc`, built by the package's own build (`setup.py`) into one
library, `slimllm.kernels._native`, which exports XLA FFI handlers (`slimllm_linear`, ...) and
picks its instruction set at run time (`isa()`: "avx512-amx", "avx512-bf16", "avx512-vnni",
"avx512" or "portable"). The build is optional: where it failed, or with `SLIMLLM_KERNELS=off` in
the environment, `available()` is False and every program takes the pure-XLA path, with the same
results up to the order of float32 sums.

A program chooses per `Runtime.kernels` ("auto": the kernels where the library loaded, in
float32 arithmetic; "fast": also weight products on x rounded: for more than 4 rows, in AMX
tiles where the CPU has AMX (to bfloat16 for bfloat16 weights, to int8 per 32 or 64 columns for
int8/int4; int4 against more than 16 rows meets x in bfloat16, its codes widened to bfloat16
values), else in AVX512-BF16 / VNNI dot products where the CPU has them (x to bfloat16 against
bfloat16 weights, at any number of rows where an engine stored them in pair order; to int8 per
lane of 64-column steps against int8 codes, per 32 columns against int4 codes in groups of 32;
other codes widened to bfloat16 values); otherwise to 16-bit integers for int8/int4 weights;
"xla": never).
`choose(...)` sets that choice while a program is traced (`model.forward` does), and a
kernel's wrapper (`linear.py`) asks `active()` before it emits its custom call; the engine keys
its compiled programs by the Runtime, so both paths can live in one process.

`python setup.py build_ext --inplace` builds the library into this folder of a source checkout.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import re

import jax

from slimllm.reference.errors import OptionError, shown
from slimllm.reference.runtime import KERNELS

__all__ = [
    "KERNELS",
    "PEAK_INSTRUCTIONS",
    "TIERS",
    "active",
    "available",
    "choice",
    "choose",
    "isa",
    "linger_taken",
    "linger_us",
    "peak_macs",
    "set_linger_us",
    "target",
    "why_unavailable",
]

OFF = ("0", "off", "false", "no", "xla")
TURNED_OFF = "turned off by SLIMLLM_KERNELS"
TIERS = ("portable", "avx512", "avx512-vnni", "avx512-bf16", "avx512-amx")  # SLIMLLM_KERNELS_ISA
# multiply-add instructions `peak_macs` measures (src/peak.cc's kinds, in order), zmm registers:
# float32 FMA (16 a time), VDPBF16PS (32 bfloat16 pairs), VPDPBUSD (64 byte products)
PEAK_INSTRUCTIONS = ("fma", "vdpbf16ps", "vpdpbusd")
_choice = ["auto"]  # the choice of the program being traced (a stack, see `choose`)
LINGER_MAX_US = 1_000_000  # src/cpu.cc kLingerMaxUs


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None and why not."""
    if os.environ.get("SLIMLLM_KERNELS", "").strip().lower() in OFF:
        return None, TURNED_OFF
    forced = os.environ.get("SLIMLLM_KERNELS_ISA")
    if forced is not None and forced not in TIERS:  # the library would ignore it
        raise OptionError(f"SLIMLLM_KERNELS_ISA={shown(forced)} is not one of {', '.join(TIERS)}")
    linger = os.environ.get("SLIMLLM_KERNELS_LINGER_US")
    if linger is not None and not (
        re.fullmatch(r"[0-9]+", linger) and int(linger) <= LINGER_MAX_US
    ):
        raise OptionError(  # the library would take its default
            f"SLIMLLM_KERNELS_LINGER_US={shown(linger)} is not a whole number of microseconds"
            f" in 0..{LINGER_MAX_US}"
        )
    try:
        spec = importlib.util.find_spec(f"{__name__}._native")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None, "the compiled library was not built (see DEVELOPERS.md: kernels)"
    try:
        return ctypes.CDLL(spec.origin), ""
    except OSError as e:
        return None, f"the compiled library does not load: {e}"


def available() -> bool:
    """Did the compiled library load (and is it not turned off)?"""
    return _library()[0] is not None


def why_unavailable() -> str:
    return _library()[1]


@functools.cache
def isa() -> str:
    """The instruction set the kernels run on this CPU, one of TIERS (each holds the ones before
    it), or "xla" (no library). Chosen once per process; SLIMLLM_KERNELS_ISA=<tier> caps it at
    that tier (=portable forces the portable path, =avx512-bf16 turns AMX off)."""
    lib = _library()[0]
    if lib is None:
        return "xla"
    lib.slimllm_kernels_isa.restype = ctypes.c_char_p
    return lib.slimllm_kernels_isa().decode()


@functools.cache
def target(symbol: str) -> str:
    """Register the library's FFI handler `symbol` with XLA (once) and return its target name."""
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(f"slimllm kernels unavailable: {why_unavailable()}")
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return symbol


@contextlib.contextmanager
def choose(kernels: str):
    """Trace the enclosed code with this choice (a Runtime.kernels value)."""
    _choice.append(kernels)
    try:
        yield
    finally:
        _choice.pop()


def choice() -> str:
    """The Runtime.kernels choice of the code being traced."""
    return _choice[-1]


def active() -> bool:
    """Should the code being traced call the compiled kernels?"""
    return _choice[-1] != "xla" and available()


def peak_macs(instruction: str, threads: int | None = None, seconds: float = 0.2) -> float | None:
    """Multiply-adds per second of `instruction` (one of PEAK_INSTRUCTIONS) on `threads` threads
    at once (default: the cores this process may run on), 16 independent sums a thread in
    registers, for `seconds`: the rate no product of many rows of x beats on this machine. None
    without the library, or where this CPU (or SLIMLLM_KERNELS_ISA) lacks the instruction."""
    if instruction not in PEAK_INSTRUCTIONS:
        raise OptionError(
            f"unknown instruction {shown(instruction)}: one of {', '.join(PEAK_INSTRUCTIONS)}"
        )
    threads = len(os.sched_getaffinity(0)) if threads is None else threads
    if threads < 1 or not seconds > 0:
        raise OptionError(f"need threads >= 1 and seconds > 0, not {threads} and {seconds}")
    lib = _library()[0]
    if lib is None:
        return None
    fn = lib.slimllm_peak_macs
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_double]
    rate = fn(PEAK_INSTRUCTIONS.index(instruction), threads, float(seconds))
    return rate if rate > 0 else None


def _linger(symbol: str):
    """The library's linger setter or getter, typed, or None without the library."""
    lib = _library()[0]
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64] if symbol == "slimllm_set_linger_us" else []
    return fn


def linger_taken() -> int | None:
    """How many calls' jobs lingering helpers have taken so far in this process (a counter for
    tests), or None without the library."""
    getter = _linger("slimllm_linger_taken")
    return None if getter is None else int(getter())


def set_linger_us(us: int) -> int | None:
    """How long (microseconds, 0: never) a helper thread keeps watching for the next call after
    a decode-sized call (16 rows of x or fewer, decode attention) before it returns to XLA's
    pool, where waking it again took 20-130 us on the 2-core VM of bench/README.md; the default
    is 200, or SLIMLLM_KERNELS_LINGER_US (at most LINGER_MAX_US, a second). Process-wide, from
    the next call on. Returns the previous value (None without the library)."""
    if isinstance(us, bool) or not isinstance(us, int) or not 0 <= us <= LINGER_MAX_US:
        raise OptionError(
            f"linger must be a whole number of microseconds in 0..{LINGER_MAX_US}, not {shown(us)}"
        )
    setter = _linger("slimllm_set_linger_us")
    return None if setter is None else int(setter(us))


def linger_us() -> int | None:
    """The current linger in microseconds (see `set_linger_us`), or None without the library."""
    getter = _linger("slimllm_linger_us")
    return None if getter is None else int(getter())
