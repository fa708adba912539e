"""The one tolerance table of slimllm's tests, keyed by what can differ.

float32 paths differ only by the order of float operations: 1e-5 relative for one function,
1e-4 relative (max abs diff / max abs value) for a whole model, the fixtures' published bound.
A lossy cache stores rounded values; two computations whose float32 K/V differ in the last bit
can round to neighbouring storage values (one fp16/bf16 ulp, one int8 step), so comparisons that
go through a lossy cache get the bound of one storage quantum propagated to the logits.
"""

from __future__ import annotations

import numpy as np

FUNCTION = {"float32": 1e-5}
MODEL = {"float32": 1e-4}
# One storage step relative to the largest value: K/V that differ in the last float32 bit may
# round to neighbouring stored values.
QUANTUM = {"float32": 1e-6, "float16": 2**-10, "bfloat16": 2**-7, "int8": 1 / 127}
# Same model, same inputs, two evaluation orders, through a cache of this dtype. With float32
# it is the whole-model bound: in JAX, single steps multiply in the compiled kernel and a
# prefill in XLA's product, two summation orders through every layer (1.35e-5 seen on a drawn
# 2-layer model, where XLA alone kept within 1e-5).
THROUGH_CACHE = {"float32": MODEL["float32"], "float16": 2e-4, "bfloat16": 2e-3, "int8": 2e-3}

# One attention function over a lossy cache, both sides reading the SAME stored values: widening
# fp16/bf16/int8 to float32 is exact and int8 scales enter as float32 products, so only the order
# of float32 operations differs, as for a float32 cache.
FUNCTION |= {"float16": 1e-5, "bfloat16": 1e-5, "int8": 1e-5}
# The whole model in two backends (JAX vs the NumPy reference) with the same cache dtype on both
# sides. Their float32 K/V differ in the last bits, so stored values may differ by one storage
# quantum (THROUGH_CACHE); with a float32 cache it is the model bound.
ACROSS_BACKENDS = {dtype: max(MODEL["float32"], bound) for dtype, bound in THROUGH_CACHE.items()}
# A sampling decision (argmax, top-k/top-p/min-p cut, inverse-CDF draw) may flip between the
# backends only if it sits closer than this to its threshold, its margin measured as the
# relative logit change that would flip it (`invariants.margins`). The backends' logits differ
# by at most 4.7e-6 relative on every fixture and stories260K (measured), so this allows twice
# that while a wrong draw (e.g. swapped seed words, margin ~4e-4) still fails.
DECISION = FUNCTION["float32"]


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_close(got, want, rtol: float, what: str = "") -> None:
    err = rel_err(got, want)
    assert err <= rtol, f"{what} relative error {err:.3g} > {rtol:.3g}"
