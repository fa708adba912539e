"""Fuzz config.json: every family fixture's config, one value mutated (its type swapped, made huge,
negative, zero or NaN, nested, deleted) or a key added, must load to a clean SlimllmError or to
exactly the model of the original config.

Two exceptions are the documented rules, not silent changes: deleting a key the family reads with
a default (`DEFAULTED`) may give the default's model, and the keys that tell families apart
(`DETECTION`) may pick another family. `load_config` (the config alone) takes the full example
count; `load_checkpoint` (weights too, compared tensor by tensor) a third of it.
"""

import functools
import json
import math
import os
import tempfile
from pathlib import Path

from fuzz.harness import outcome, same
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from slimllm.conformance.profiles import fuzzing
from slimllm.weights import load_checkpoint, load_config

VARIANTS = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))

# Keys read with a default: deleting one may legitimately give the default's model.
DEFAULTED = {
    "rms_norm_eps", "layer_norm_epsilon", "layernorm_epsilon", "rope_theta", "rotary_emb_base",
    "rope_ratio", "rotary_pct", "partial_rotary_factor", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "add_qkv_bias", "num_key_value_heads",
    "head_dim", "kv_channels", "inner_hidden_size", "max_position_embeddings", "seq_length",
    "max_sequence_length", "use_dynamic_ntk", "use_logn_attn", "position_encoding_2d",
    "multi_query_attention", "post_layer_norm", "do_layer_norm_before", "word_embed_proj_dim",
    "_remove_final_layer_norm",
}  # fmt: skip
# Keys that choose the family (families/__init__.py, baichuan.py): a change may choose another.
DETECTION = {"model_type", "architectures", "tokenizer_class", "inner_hidden_size"}


@functools.cache
def original(variant: str):
    return load_checkpoint(FIXTURES / variant, tokenizer=False)


def config(variant: str) -> dict:
    return json.loads((FIXTURES / variant / "config.json").read_text())


def paths(value, prefix=()):
    """Every key path of a config: top-level keys and the keys and items of nested values."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        yield (*prefix, key)
        if isinstance(v, dict | list) and len(prefix) < 2:
            yield from paths(v, (*prefix, key))


def swaps(v, key) -> list:
    """Values that are no longer `v`: another JSON type, huge, negative, zero, NaN, nested (not
    0 for a token id: that is a valid id, and ChatGLM-6B's block ids give another valid model)."""
    nested = [[v], [[v]], {"value": v}]
    if isinstance(v, bool):
        return [int(v), str(v).lower(), None, *nested]  # null: as if absent (see below)
    if isinstance(v, int | float):
        odd = [str(v), True, False, float(v) if isinstance(v, int) else int(v)]
        odd += [1e300, 10**400, -(10**400), -1, -abs(v) - 1, math.nan, math.inf, *nested]
        return odd + [0.0] + ([] if str(key).endswith("token_id") else [0])
    if isinstance(v, str):
        return [5, 1.5, True, "", *nested]
    if isinstance(v, list):
        return [{}, "x", 5, v + v, [None], {"value": v}]
    if isinstance(v, dict):
        return [[], [v], "x", 5, {**v, "mystery": 1}]
    return [5, "x", True, [1], {"value": 1}]  # null


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
ADDED = {  # keys slimllm reads or refuses when present, with their kinds of value
    "sliding_window": st.integers(-2, 10**6) | json_values,
    "use_sliding_window": st.booleans() | json_values,
    "layer_types": st.lists(st.sampled_from(["full_attention", "sliding_attention"]), max_size=3),
    "rope_parameters": json_values,
    "mystery_key": json_values,  # an unknown key that changes nothing
}


@st.composite
def mutations(draw):
    """(variant, mutated config, what was done, whether a different model is allowed by the
    documented rules: see the module docstring)."""
    variant = draw(st.sampled_from(VARIANTS))
    hf = config(variant)
    kind = draw(st.sampled_from(("swap", "swap", "delete", "add")))
    if kind == "add":
        key = draw(st.sampled_from(sorted(ADDED)))
        return variant, {**hf, key: draw(ADDED[key])}, f"add {key}", key
    path = draw(st.sampled_from(list(paths(hf))))
    parent = functools.reduce(lambda node, k: node[k], path[:-1], hf)
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(st.sampled_from(swaps(parent[path[-1]], path[-1])))
        kind = "delete" if parent[path[-1]] is None else kind  # upstream reads null as absent
    allowed = (kind == "delete" and path in {(k,) for k in DEFAULTED}) or path[0] in DETECTION
    return variant, hf, f"{kind} {path}", allowed


@fuzzing()
@given(mutations())
def test_fuzz_load_config(case):
    variant, hf, what, allowed = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(hf))
        message, cfg = outcome(load_config, path)
    assert message or same(cfg, original(variant).cfg) or allowed, (variant, what, cfg)


@settings(fuzzing(), max_examples=max(3, fuzzing().max_examples // 3))
@given(mutations())
def test_fuzz_load_checkpoint(case):
    variant, hf, what, allowed = case
    with tempfile.TemporaryDirectory() as tmp:
        for f in (FIXTURES / variant).iterdir():
            if f.name != "config.json":
                os.symlink(f, Path(tmp) / f.name)
        (Path(tmp) / "config.json").write_text(json.dumps(hf))
        message, loaded = outcome(load_checkpoint, tmp, tokenizer=False)
    first = original(variant)
    assert (
        message or (same(loaded.cfg, first.cfg) and same(loaded.params, first.params)) or allowed
    ), (variant, what, loaded.cfg)
