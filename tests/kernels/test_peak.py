"""The multiply-add peaks behind the benchmarks' compute floor (`kernels.peak_macs`,
`src/peak.cc`) and the instruction each format's products of many rows run on
(`kernels.linear.batched_instruction`). No rate is asserted beyond being one: speed belongs to
the benchmarks."""

import math

import pytest

from kernel_paths import needs_library, on_path
from slimllm import kernels
from slimllm.kernels import linear
from slimllm.reference.errors import OptionError

pytestmark = needs_library

NEEDS = {"fma": "avx512", "vdpbf16ps": "avx512-bf16", "vpdpbusd": "avx512-vnni"}  # least tier


def check_peaks():
    """Each instruction has a rate where this process's tier holds it, and None where not."""
    tier = kernels.TIERS.index(kernels.isa())
    for instruction in kernels.PEAK_INSTRUCTIONS:
        for threads in (1, 2):
            rate = kernels.peak_macs(instruction, threads=threads, seconds=0.01)
            if tier >= kernels.TIERS.index(NEEDS[instruction]):
                assert rate is not None and rate > 0 and math.isfinite(rate), (instruction, rate)
            else:
                assert rate is None, (instruction, rate)


def test_every_instruction_this_cpu_offers_has_a_rate():
    check_peaks()


def test_a_capped_tier_has_no_rate_for_what_it_turns_off():
    """SLIMLLM_KERNELS_ISA=avx512 turns VNNI and BF16 off: their rates are None (a process of its
    own), the FMA's is measured."""
    on_path("avx512", "test_peak", "check_peaks()")


def test_bad_requests_are_refused_and_no_library_has_no_rate(monkeypatch):
    with pytest.raises(OptionError, match="unknown instruction 'vfmadd'"):
        kernels.peak_macs("vfmadd")
    for threads, seconds in [(0, 0.1), (1, 0.0), (1, -1.0)]:
        with pytest.raises(OptionError, match="threads >= 1 and seconds > 0"):
            kernels.peak_macs("fma", threads=threads, seconds=seconds)
    monkeypatch.setattr(kernels, "_library", lambda: (None, "not built"))
    assert kernels.peak_macs("fma") is None


@pytest.mark.parametrize(
    "tier, expected",
    [
        ("xla", {}),
        ("portable", {}),
        ("avx512", {"int8": "fma", "int4": "fma", "bfloat16": "fma"}),
        ("avx512-vnni", {"int8": None, "int4": None, "bfloat16": "fma", "int4 g48": "fma"}),
        (
            "avx512-bf16",
            {
                "int8": "vpdpbusd",
                "int8 g32": "vdpbf16ps",
                "int4": "vpdpbusd",
                "int4 g64": "vdpbf16ps",
                "int4 g48": "fma",
                "bfloat16": "vdpbf16ps",
            },
        ),
        ("avx512-amx", {"int8": None, "int4": None, "bfloat16": None}),
    ],
)
def test_each_format_names_the_instruction_of_its_road(monkeypatch, tier, expected):
    """The instruction follows `src/linear.cc`'s roads for more than 4 rows of x (int8 per row,
    int4 in groups of 32 by default): "auto" and "xla" widen every format to float32, "fast"
    takes the integer and bfloat16 roads the CPU has; None where no measured instruction
    applies (no AVX-512, AMX tiles, the 16-bit integer road)."""
    monkeypatch.setattr(linear, "isa", lambda: tier)
    default = {"int8": None, "int4": 32, "bfloat16": None}
    plain = None if tier in ("xla", "portable") else "fma"
    for name, group in [("float32", None), ("float16", None), *default.items()]:
        assert linear.batched_instruction(name, group, "auto") == plain
        assert linear.batched_instruction(name, group, "xla") == plain
    for case, instruction in expected.items():
        name, _, g = case.partition(" g")
        group = int(g) if g else default[name]
        assert linear.batched_instruction(name, group, "fast") == instruction, case
    if tier not in ("xla", "portable"):
        assert linear.batched_instruction("float32", None, "fast") == "fma"
