"""JAX attention invariants: slim == flash == naive, the int8 cache's bounds, no float copy.

Like tests/reference/test_attention.py, for the jit-compiled JAX functions: query-row blocks,
tiles and key blocks drawn from sizes that divide the padded cache, split-key decode, every mask
and cache dtype. The int8 cache must never be widened as a whole: the compiled decode program
over a 4096-token int8 cache holds no float32 value even an eighth of a float copy of one
layer's keys, and its scratch memory could not hold one.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimllm.conformance import profiles
from slimllm.conformance import strategies as S
from slimllm.conformance.invariants import int8_within_bound, kinds_agree
from slimllm.conformance.pairs import attend
from slimllm.conformance.tolerances import FUNCTION
from slimllm.jaxbackend import kv_cache as jax_kv
from slimllm.jaxbackend.generate import decode_fn
from slimllm.jaxbackend.params import to_device
from slimllm.jaxbackend.positions import device_state
from slimllm.jaxbackend.runtime import ATTENTION, Runtime
from slimllm.reference import kv_cache as ref_kv
from slimllm.reference.config import ModelConfig
from slimllm.reference.params import init_params
from slimllm.reference.positions import SeqState


def run(case, kind, options=()):
    q, cache, bias, scale = case.jax()
    return attend(q, cache, bias, kernel=S.Kernel(ATTENTION[kind], options), scale=scale)


@profiles.compiling(5)
@given(S.attention_cases(), S.attention_options("slim"), S.attention_options("flash"))
def test_slim_and_flash_equal_naive(case, slim, flash):
    outputs = {
        "naive": run(case, "naive"),
        "slim": run(case, "slim", slim),
        "flash": run(case, "flash", flash),
    }
    kinds_agree(outputs, FUNCTION[case.kv_dtype])


@profiles.compiling(8)
@given(S.attention_cases(t=1), st.sampled_from((2, 3, 4)), st.sampled_from((16, 32)))
def test_split_key_decode_equals_naive(case, splits, key_block):
    """Decode over key chunks of whole key blocks, merged by their (max, sum, output)."""
    options = (("key_splits", splits), ("key_block", key_block))
    kinds_agree(
        {"naive": run(case, "naive"), "slim": run(case, "slim", options)}, FUNCTION[case.kv_dtype]
    )


@profiles.compiling(15)
@given(S.attention_cases(kv_dtype="int8"))
def test_hybrid_int8_equals_naive_on_dequantised_values(case):
    """Scales on score columns and folded into probabilities == attention over q * scale."""
    q, cache, bias, scale = case.jax()
    k, v = ref_kv.dequantized(case.reference()[1])
    dense = S.jax_cache(ref_kv.KVCache((k,), (v,), format="float32"))
    want = attend(q, dense, bias, kernel=S.Kernel(ATTENTION["naive"]), scale=scale)
    kinds_agree(
        {
            "naive": want,
            "int8": attend(
                q,
                cache,
                bias,
                kernel=S.Kernel(ATTENTION["naive"], (("key_block", 16),)),
                scale=scale,
            ),
        }
    )


@profiles.compiling(5)
@given(S.attention_cases(kv_dtype="int8"))
def test_int8_writes_are_within_half_a_step(case):
    b, n = case.k.shape[:2]
    cache = jax_kv.init_cache(case.cfg, b, case.length, "int8")
    cache = jax.jit(jax_kv.write, static_argnums=1)(
        cache, 0, jnp.asarray(case.k), jnp.asarray(case.v), jnp.broadcast_to(jnp.arange(n), (b, n))
    )
    for values, scales, x in ((cache.k, cache.k_scale, case.k), (cache.v, cache.v_scale, case.v)):
        # stored [b,k,s,d] at slots 0..n-1 hold x [b,n,k,d]
        q, s = np.asarray(values[0])[:, :, :n], np.asarray(scales[0])[:, :, :n]
        int8_within_bound(q, s, x.transpose(0, 2, 1, 3))


LONG = ModelConfig(
    vocab=32,
    width=64,  # weights (the fused [(h + 2k) d, e] qkv) stay far below the cache checks
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    head_dim=64,
    ffn_width=64,
    max_len=4096,
)


def f32_shapes(hlo: str):
    return [
        tuple(int(n) for n in dims.split(",") if n)
        for dims in re.findall(r"\bf32\[([\d,]*)\]", hlo)
    ]


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_int8_decode_never_materialises_a_float_copy_of_the_cache(attention):
    """Compiled HLO of one decode step over a 4096-slot int8 cache (1 layer, [1,2,4096,64]):
    the int8 cache is there, key blocks are widened ([1,2,n,64] f32, n <= 256), and no float32
    value anywhere (fusions included) but RoPE's tables has an eighth of the cache's elements.
    The XLA path: the compiled kernels (tests/kernels) read the int8 cache themselves, no float
    value in sight."""
    s, cfg = LONG.max_len, LONG
    cache = jax_kv.init_cache(cfg, 1, s, "int8")
    state = device_state(
        SeqState(np.array([s - 1]), np.zeros(1, int), np.zeros(1, int), np.ones(1, np.float32))
    )
    args = (to_device(init_params(cfg)), jnp.zeros(1, jnp.int32), cache, state)
    jitted = jax.jit(decode_fn, static_argnames=("cfg", "rt"), donate_argnums=2)
    rt = Runtime(attention=attention, kernels="xla")
    compiled = jitted.lower(*args, cfg=cfg, rt=rt).compile()
    hlo = compiled.as_text()
    elements = 1 * cfg.n_kv_heads * s * cfg.head_dim
    assert f"s8[1,2,{s},64]" in hlo, "the int8 cache is not in the program"
    blocks = [shape for shape in f32_shapes(hlo) if shape[:2] == (1, 2) and shape[3:] == (64,)]
    assert any(shape[2] <= 256 for shape in blocks), "no key-block-sized float32 values"
    rope = (s, cfg.rotary_dim // 2)  # RoPE's cos and sin of every slot (positions.rope_tables)
    biggest = max((shape for shape in f32_shapes(hlo) if shape != rope), key=math.prod)
    assert math.prod(biggest) < elements / 8, f"float32 {list(biggest)} in the program"
    float_copy = 4 * elements  # bytes of a float32 copy of this layer's keys
    assert compiled.memory_analysis().temp_size_in_bytes < float_copy
