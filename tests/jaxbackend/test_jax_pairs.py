"""Every reference function against its JAX twin on Hypothesis-drawn inputs (conformance.pairs).

One test per pair: inputs and the comparison (1e-5 relative for float32 functions, exact for
ids, codes and stored values, decision margins for sampling) come from the pair's entry, so a
new twin is covered by adding one line to `PAIRS`. Pairs whose examples each compile a sizeable
XLA program draw fewer examples (`Pair.cost`), never fewer than `profiles.MIN_EXAMPLES`.
The coverage test finds the twins itself: a new public function in both backends fails it until
it has a pair (or an entry in `ELSEWHERE`).
"""

import importlib
import importlib.util
import inspect
import pkgutil
import re

import pytest
from hypothesis import given, settings

from conftest import ROOT
from slimllm import reference
from slimllm.conformance import profiles
from slimllm.conformance.pairs import PAIRS
from slimllm.reference.kv_cache import KV_FORMATS
from slimllm.reference.runtime import ATTENTION

# Twins that are not maths over arrays, and the files that check them instead of a pair.
ELSEWHERE = {
    # host loops over a JAX Engine: their generations are compared with the reference's
    **dict.fromkeys(
        ("generate.prefill", "generate.decode", "generate.stream", "generate.generate"),
        ("tests/jaxbackend/test_jax_generate.py", "tests/jaxbackend/test_jax_oracles.py"),
    ),
    # a lookup in the KV_FORMATS table: both backends' tables are checked entry by entry
    "kv_cache.kv_format": ("tests/reference/test_runtime.py",),
    # beam search: a host loop over an Engine, and its cache reorder (a compiled gather), both
    # compared with the reference's (ids, scores, every reordered leaf, at tp 1 and 2)
    **dict.fromkeys(("beam.generate", "beam.reorder"), ("tests/jaxbackend/test_jax_beam.py",)),
    # compared with the reference on drawn logits (ties, huge, tiny) for several n, ids exact
    "logprobs.token_logprobs": ("tests/jaxbackend/test_jax_logprobs.py",),
}


@pytest.mark.parametrize("pair", PAIRS, ids=[pair.name for pair in PAIRS])
def test_jax_twin_agrees_with_the_reference(pair):
    examples = 0

    def check(case):
        nonlocal examples
        examples += 1
        pair.check(case)

    check.__name__ = re.sub(r"\W", "_", pair.name)  # one Hypothesis database entry per pair
    profiles.compiling(pair.cost)(given(pair.inputs)(check))()
    assert examples >= min(profiles.MIN_EXAMPLES, settings().max_examples), examples


def twins() -> set[str]:
    """module.function for every public function defined in a module of reference/ whose name
    is also a callable of the same module of jaxbackend/, other than the very same function
    (some JAX modules re-export the reference's host-side functions)."""
    found = set()
    for info in pkgutil.iter_modules(reference.__path__):
        jax_name = f"slimllm.jaxbackend.{info.name}"
        if importlib.util.find_spec(jax_name) is None:
            continue
        ref_module = importlib.import_module(f"slimllm.reference.{info.name}")
        jax_module = importlib.import_module(jax_name)
        for name, fn in vars(ref_module).items():
            if name.startswith("_") or not inspect.isfunction(fn):
                continue
            if fn.__module__ != ref_module.__name__:
                continue  # imported from elsewhere
            twin = getattr(jax_module, name, None)
            if callable(twin) and twin is not fn:
                found.add(f"{info.name}.{name}")
    return found


def test_every_reference_function_with_a_twin_is_paired():
    """Every twin the backends define has a pair (`module.function`, maybe with a `[...]`
    suffix) or is checked elsewhere, by a test `ELSEWHERE` names."""
    paired = {pair.name.split("[")[0] for pair in PAIRS}
    found = twins()
    unpaired = sorted(found - paired - set(ELSEWHERE))
    assert not unpaired, f"{len(unpaired)} functions with a JAX twin lack a pair: {unpaired}"
    assert "model.forward" in found and "ops.rms_norm" in found  # discovery finds the twins


def test_every_exemption_names_a_twin_and_where_it_is_checked():
    """An ELSEWHERE entry is a current twin without a pair, and names existing tests."""
    found, paired = twins(), {pair.name.split("[")[0] for pair in PAIRS}
    for name, where in ELSEWHERE.items():
        assert name in found, f"{name} is no longer a reference function with a JAX twin"
        assert name not in paired, f"{name} has a pair now: drop its exemption"
        for path in where:
            assert (ROOT / path).exists(), f"{name}: {path} does not exist"


def test_every_attention_kind_is_paired_for_every_cache_format():
    """One pair per (kind, format) of the registries, and the key-blocked form per format."""
    names = {pair.name for pair in PAIRS}
    kinds = {f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}" for fn in ATTENTION.values()}
    attention = {name for name in names if name.split("[")[0] in kinds}
    assert attention == {f"{kind}[{fmt}]" for kind in kinds for fmt in KV_FORMATS}, attention
    blocked = {name for name in names if name.startswith("key_blocks.exact_rows[")}
    assert blocked == {f"key_blocks.exact_rows[{fmt}]" for fmt in KV_FORMATS}, blocked
