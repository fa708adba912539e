"""The run-settings value and the KV format tables: validated once, one entry per format, the
same names in both backends."""

import numpy as np
import pytest

from slimllm.jaxbackend import kv_cache as jax_kv
from slimllm.jaxbackend import runtime as jax_runtime
from slimllm.reference import kv_cache
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.runtime import ATTENTION, Runtime, attention_fn
from slimllm.reference.slim_attention import slim_attention

CFG = ModelConfig(
    vocab=64, width=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=48, max_len=32
)


def test_runtime_is_a_hashable_value_with_defaults():
    assert Runtime() == Runtime() and hash(Runtime()) == hash(Runtime())
    assert {Runtime(), Runtime(attention="slim")} == {Runtime(), Runtime("jax", "slim")}
    assert Runtime(backend="numpy", kv_dtype="int8", tp=1).describe() == "numpy:naive:int8"
    assert Runtime(attention="slim", tp=2).describe() == "jax:slim:float32:tp2"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
        ({"attention": "paged"}, "unknown attention 'paged'"),
        ({"kv_dtype": "int4"}, "unknown kv cache dtype 'int4'"),
        ({"transport": "tcp"}, "unknown transport 'tcp'"),
        ({"tp": 0}, "tp must be an integer >= 1"),
        ({"tp": 2.0}, "tp must be an integer >= 1"),
        ({"tp": -1}, "tp must be an integer >= 1"),
        ({"tp": True}, "tp must be an integer >= 1"),
        ({"tp": 2, "backend": "numpy"}, "needs the jax backend"),
        ({"cache_len": 0}, "cache_len must be a positive integer"),
        ({"cache_len": 2.5}, "cache_len must be a positive integer"),
        ({"cache_len": True}, "cache_len must be a positive integer"),
        ({"weights": "int3"}, "unknown weight format 'int3'"),
        ({"weight_group": 0}, "weight_group must be a positive integer"),
        ({"weight_group": True}, "weight_group must be a positive integer"),
        ({"weight_group": 32}, "a weight group needs a quantised weight format"),
        ({"weights": "bfloat16", "weight_group": 32}, "a weight group needs a quantised"),
    ],
)
def test_runtime_rejects_each_bad_setting_by_name(changes, message):
    with pytest.raises(OptionError, match=message):
        Runtime(**changes)


def test_attention_options_reach_the_attention_function():
    rt = Runtime(attention="slim", attention_options=(("mb", 3), ("key_splits", 2)))
    fn = attention_fn(rt)
    assert fn.func is slim_attention and fn.keywords == {"mb": 3, "key_splits": 2}
    assert attention_fn(Runtime(attention="flash")) is ATTENTION["flash"]


def test_both_backends_offer_the_same_kinds_and_formats():
    assert tuple(jax_runtime.ATTENTION) == tuple(ATTENTION)
    assert tuple(jax_kv.KV_FORMATS) == tuple(kv_cache.KV_FORMATS)
    for name, fmt in kv_cache.KV_FORMATS.items():
        twin = jax_kv.KV_FORMATS[name]
        assert (twin.scaled, twin.pack, twin.wide) == (fmt.scaled, fmt.pack, fmt.wide), name
        assert np.dtype(twin.storage).itemsize == np.dtype(fmt.storage).itemsize, name


@pytest.mark.parametrize("name", kv_cache.KV_DTYPES)
def test_a_format_entry_says_how_its_cache_is_stored(name):
    """The cache's arrays, its encoding and its size all follow the entry."""
    fmt = kv_cache.KV_FORMATS[name]
    cache = kv_cache.init_cache(CFG, 2, 5, name)
    d = fmt.stored_dim(8)
    assert cache.k[0].dtype == np.dtype(fmt.storage) and cache.k[0].shape == (2, 2, 5, d)
    assert (cache.k_scale is not None) == fmt.scaled
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 8)).astype(np.float32)
    stored, scale = fmt.encode(x)
    assert stored.dtype == np.dtype(fmt.storage) and (scale is not None) == fmt.scaled
    widened = fmt.widen(stored) * (scale[..., None] if fmt.scaled else 1)
    bound = {True: 0.0, False: 1e-2}[fmt.wide]  # float32 is exact; others one storage step
    assert np.abs(widened - x).max() <= bound * np.abs(x).max() + 1e-7 * fmt.wide
    per_vector = d * np.dtype(fmt.storage).itemsize + 4 * fmt.scaled
    assert kv_cache.nbytes_per_token(CFG, name) == 2 * 3 * 2 * per_vector
