"""The compiled SlimAttention (`slimllm.kernels.attention`) against the reference's naive
attention, the definition, on both of its instruction-set paths.

Conformance: every mask kind (causal, ALiBi, prefix-LM), grouped heads, rows that see no key,
decode (t = 1, keys split into chunks and merged) and prefill long enough for several query
blocks and key panels, over float32, bfloat16 and int8 caches, within the float32 function
tolerance. The kernel runs under jit and inside shard_map (heads split over 2 XLA devices);
The JAX backend's naive attention is the same kernel with one block of every row and one key
chunk per kv head, checked the same way. `attention="slim"` and "naive" programs hold its custom
call unless the runtime says "xla", and slim attention generates the
oracle's ids either way (stories260K, tp 1 and 2, and every fixture family). The pure-XLA path
stays tested equal to the reference too.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import slimllm
from conftest import FIXTURES, VARIANTS
from kernel_paths import needs_library, on_path
from slimllm import kernels
from slimllm.conformance.strategies import AttentionCase
from slimllm.conformance.tolerances import FUNCTION, MODEL, assert_close
from slimllm.jaxbackend import kv_cache as jax_kv
from slimllm.jaxbackend.attention import naive_attention as jax_naive_attention
from slimllm.jaxbackend.slim_attention import slim_attention
from slimllm.kernels import attention as kernel
from slimllm.reference import positions
from slimllm.reference.attention import naive_attention
from slimllm.reference.config import ModelConfig

pytestmark = needs_library

# (b, t, kv heads, heads per kv head, d, mask, cache dtype, past tokens, spare slots, mb)
CASES = [
    (1, 7, 1, 2, 16, "causal", "float32", 0, 0, None),
    (2, 37, 2, 3, 32, "alibi", "float32", 5, 3, None),
    (2, 100, 2, 1, 128, "prefix", "int8", 20, 7, None),
    (2, 29, 1, 4, 16, "causal", "bfloat16", 70, 2, 5),  # blocks of 5 rows: every tile tail
    (1, 600, 2, 1, 128, "causal", "float32", 0, 40, None),  # two blocks, 20 key panels
    (1, 300, 1, 1, 128, "alibi", "int8", 100, 0, 64),
    (1, 1, 2, 4, 128, "causal", "float32", 300, 10, None),  # decode: keys in chunks
    (2, 1, 1, 1, 16, "prefix", "int8", 600, 0, None),
    (2, 3, 2, 2, 64, "alibi", "bfloat16", 40, 1, None),  # a few positions: decode path
    (1, 5, 1, 2, 8, "causal", "int8", 3, 0, None),  # d = 8: the portable path on every CPU
    (2, 6, 3, 1, 24, "prefix", "float32", 9, 0, None),
]


def case(b, t, kh, g, d, mask, kv_dtype, past, spare, seed=0) -> AttentionCase:
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(
        vocab=16,
        width=kh * g * d,
        n_layers=1,
        n_heads=kh * g,
        n_kv_heads=kh,
        head_dim=d,
        ffn_width=8,
        max_len=4096,
        pos="alibi" if mask == "alibi" else "rope",
    )
    n = past + t
    prefix = rng.integers(0, n + 1, b) if mask == "prefix" else np.zeros(b, np.int64)
    state = positions.SeqState(np.full(b, past), prefix, np.zeros(b, np.int64), np.ones(b))
    q = (rng.standard_normal((b, t, kh * g, d)) * 2).astype(np.float32)
    k = (rng.standard_normal((b, n, kh, d)) * 2).astype(np.float32)
    v = rng.standard_normal((b, n, kh, d)).astype(np.float32)
    return AttentionCase(cfg, q, k, v, state, n + spare, kv_dtype)


@functools.partial(jax.jit, static_argnames=("scale", "choice", "mb", "kind"))
def attend(q, cache, bias, *, scale, choice, mb=None, kind="slim"):
    """SlimAttention (or the JAX backend's naive attention) on layer 0, traced with this kernels
    choice (part of the jit key)."""
    with kernels.choose(choice):
        if kind == "naive":
            return jax_naive_attention(q, jax_kv.read(cache, 0), bias, scale)
        return slim_attention(q, jax_kv.read(cache, 0), bias, scale, mb=mb)


def hide_rows(bias, rows):
    """The bias with these query rows seeing no key (as padding rows would)."""
    bias = np.array(bias)
    bias[:, :, rows] = -np.inf
    return bias


def check_cases(cases=CASES, choice="auto", kinds=("slim", "naive")):
    """Both attentions the kernel computes: SlimAttention's blocks and naive attention's one
    block of every row (decode: one key chunk per kv head, nothing merged)."""
    for args in cases:
        c = case(*args[:-1])
        q, kv, bias, scale = c.reference()
        jq, cache, jbias, _ = c.jax()
        t = q.shape[1]
        for hidden, kind in itertools.product(([], [0, t - 1]), kinds):
            want = naive_attention(q, kv, hide_rows(bias, hidden), scale)  # rows seeing nothing: 0
            jb = jnp.asarray(hide_rows(jbias, hidden))
            got = attend(jq, cache, jb, scale=scale, choice=choice, mb=args[-1], kind=kind)
            assert_close(np.asarray(got), want, FUNCTION[c.kv_dtype], f"{kind} {args}")
            assert not np.asarray(got)[:, hidden].any(), args


def test_kernel_equals_naive_attention():
    check_cases()


def test_the_portable_path_equals_it_too():
    """The same checks with the AVX-512 path turned off (a process of its own: the path is
    chosen once per process)."""
    on_path("portable", "test_attention_kernel", "check_cases()")


def test_the_xla_path_equals_naive_attention():
    """With kernels off the XLA blocks run, still the definition's result."""
    check_cases(CASES[:3] + CASES[6:7], choice="xla")


def test_the_programs_call_the_kernel_unless_told_not_to():
    c = case(*CASES[1][:-1])
    jq, cache, jbias, scale = c.jax()

    def text(choice, kind):
        return attend.lower(jq, cache, jbias, scale=scale, choice=choice, kind=kind).as_text()

    for kind in ("slim", "naive"):
        assert "slimllm_attention" in text("auto", kind)
        assert "slimllm_attention" not in text("xla", kind)


def test_a_float16_cache_stays_with_xla():
    c = case(1, 4, 1, 1, 16, "causal", "float16", 2, 0)
    q, cache, bias, scale = c.jax()
    assert kernel.slim_attention(q, jax_kv.read(cache, 0), bias, scale) is None
    assert kernel.naive_attention(q, jax_kv.read(cache, 0), bias, scale) is None


def test_heads_split_over_two_devices_with_shard_map():
    """Each device attends with its own heads and kv heads (tensor parallelism's split)."""
    c = case(1, 40, 2, 2, 32, "alibi", "int8", 30, 6)
    q, kv, bias, scale = c.reference()
    want = naive_attention(q, kv, bias, scale)
    jq, cache, jbias, _ = c.jax()
    layer = jax_kv.read(cache, 0)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    heads = P(None, "tp")  # q, bias, out: [b,t,h,d] split on h; cache [b,k,s,d] on k

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(None, None, "tp"), heads, heads, heads, heads, heads),
        out_specs=P(None, None, "tp"),
    )
    def split(q, k, v, k_scale, v_scale, bias):
        local = jax_kv.LayerKV(k, v, k_scale, v_scale, layer.fmt)
        out = kernel.slim_attention(q, local, bias, scale)
        assert out is not None  # traced: the kernel applies
        return out

    got = split(jq, layer.k, layer.v, layer.k_scale, layer.v_scale, jbias)
    assert (
        "slimllm_attention"
        in split.lower(jq, layer.k, layer.v, layer.k_scale, layer.v_scale, jbias).as_text()
    )
    assert_close(np.asarray(got), want, FUNCTION["int8"], "shard_map")


@pytest.mark.parametrize(("choice", "tp"), [("auto", 1), ("xla", 1), ("auto", 2)])
def test_slim_generation_gives_the_oracles_ids(stories, choice, tp):
    model, oracle = stories
    prompt = oracle["prompt_a"].tolist()
    n = len(oracle["greedy_a"])
    got = slimllm.generate(
        model,
        ids=[prompt],
        max_new_tokens=n,
        eos_ids=(),
        attention="slim",
        kernels=choice,
        tp=tp,
    )
    assert got.ids[0] == oracle["greedy_a"].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_fixture_greedy_with_slim_attention_is_the_oracles(variant):
    """Each family's masks and heads (ALiBi, prefix-LM, grouped kv heads) through the kernel."""
    model, oracle = slimllm.load(FIXTURES / variant), np.load(FIXTURES / variant / "oracle.npz")
    options = dict(max_new_tokens=len(oracle["greedy_a"]), eos_ids=(), return_logits=True)
    got = slimllm.generate(model, ids=[oracle["prompt_a"].tolist()], attention="slim", **options)
    assert got.ids[0] == oracle["greedy_a"].tolist()
    assert_close(got.logits[0], oracle["logits_greedy_a"], MODEL["float32"], variant)
