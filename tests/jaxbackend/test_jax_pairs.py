"""Every reference function against its JAX twin on Hypothesis-drawn inputs (conformance.pairs).

One test per pair: inputs and the comparison (1e-5 relative for float32 functions, exact for
ids, codes and stored values, decision margins for sampling) come from the pair's entry, so a
new twin is covered by adding one line to `PAIRS`. Pairs whose examples each compile a sizeable
XLA program draw fewer examples (`Pair.cost`).
"""

import re

import pytest
from hypothesis import given

from slimllm.conformance import profiles
from slimllm.conformance.pairs import PAIRS


@pytest.mark.parametrize("pair", PAIRS, ids=[pair.name for pair in PAIRS])
def test_jax_twin_agrees_with_the_reference(pair):
    def check(case):
        pair.check(case)

    check.__name__ = re.sub(r"\W", "_", pair.name)  # one Hypothesis database entry per pair
    profiles.compiling(pair.cost)(given(pair.inputs)(check))()


def test_every_reference_function_with_a_twin_is_paired():
    """The table covers the functions the issue lists, by name."""
    names = {pair.name.split("[")[0] for pair in PAIRS}
    for module, functions in {
        "ops": "rms_norm layer_norm silu gelu_tanh relu swiglu_mlp gelu_mlp relu_mlp softmax "
        "log_softmax",
        "quant": "quantize",
        "positions": "inv_freq rope_angles apply_rope apply_rope2d wavelength_scale logn_scale "
        "positions_for",
        "attention": "attention_bias naive_attention",
        "key_blocks": "exact_rows",
        "kv_cache": "write read",
        "model": "qkv block embed unembed forward",
        "sampling": "uniform threefry2x32 repetition_penalty top_k_filter top_p_filter "
        "min_p_filter process choose sample",
    }.items():
        for fn in functions.split():
            assert f"{module}.{fn}" in names, f"{module}.{fn} has no pair"
    dtypes = {pair.name for pair in PAIRS if "attention[" in pair.name}
    assert len(dtypes) == 12, sorted(dtypes)  # three kinds x four cache dtypes
    blocked = {pair.name for pair in PAIRS if pair.name.startswith("key_blocks.exact_rows[")}
    assert len(blocked) == 4, sorted(blocked)  # the shared key-blocked form, every cache dtype
