"""JAX token logprobs (jaxbackend/logprobs.py) == the reference's, and `generate(logprobs=n)` in
both JAX modes' contract: same ids, chosen logprob = log_softmax of the returned logits, greedy
picks the top alternative, the NumPy backend agrees within the model tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slimllm
from slimllm.conformance.tolerances import ACROSS_BACKENDS, FUNCTION, assert_close
from slimllm.jaxbackend.logprobs import token_logprobs
from slimllm.reference import logprobs as ref
from slimllm.reference.errors import OptionError

compiled = jax.jit(token_logprobs, static_argnums=2)


def drawn_logits(kind: str, seed: int = 0) -> np.ndarray:
    """[4, 96] float32 logits of one kind: normal, integer-valued (many ties), huge, tiny."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((4, 96))
    return {
        "normal": normal * 3,
        "ties": rng.integers(-2, 3, (4, 96)),
        "huge": normal * 1e37,
        "tiny": normal * 1e-30,
        "mixed": np.where(rng.random((4, 96)) < 0.5, normal * 1e20, rng.integers(0, 2, (4, 96))),
    }[kind].astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "ties", "huge", "tiny", "mixed"])
@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_jax_equals_reference(kind, n):
    logits = drawn_logits(kind)
    ids = np.array([0, 95, 40, int(np.argmax(logits[3]))])
    want = ref.token_logprobs(logits, ids, n)
    got = [np.asarray(a) for a in compiled(jnp.asarray(logits), jnp.asarray(ids), n)]
    assert got[1].dtype == np.int32 and got[1].shape == (4, n) and got[2].dtype == np.float32
    assert got[1].tolist() == want[1].tolist(), "top ids or their tie order differ"
    assert_close(got[0], want[0], FUNCTION["float32"], "chosen")
    if n:
        assert_close(got[2], want[2], FUNCTION["float32"], "top")


PROMPTS = [[1, 403, 407, 261], [1, 66, 30]]
OPTIONS = dict(ids=PROMPTS, max_new_tokens=6, eos_ids=(), seed=[3, 4], cache_len=256)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generate_logprobs_match_their_logits(stories, sampled):
    model, _ = stories
    settings = dict(temperature=0.9, top_k=20, repetition_penalty=1.3) if sampled else {}
    run = dict(OPTIONS, **settings)
    out = slimllm.generate(model, backend="jax", return_logits=True, logprobs=4, **run)
    loop = slimllm.generate(model, backend="jax", mode="loop", **run)
    assert out.ids == loop.ids, "recording logprobs changed the tokens"
    for ids, logits, steps in zip(out.ids, out.logits, out.logprobs, strict=True):
        want = ref.log_softmax(logits)  # [n,v] from the logits that chose each id
        chosen = np.array([s.logprob for s in steps])
        assert_close(chosen, want[np.arange(len(ids)), ids], FUNCTION["float32"], "chosen")
        top_ids = [[i for i, _ in s.top] for s in steps]
        assert top_ids == np.argsort(-logits, axis=-1, kind="stable")[:, :4].tolist()
        if not sampled:  # greedy without a penalty: the chosen id is the most likely
            assert all(s.top[0] == (token, s.logprob) for token, s in zip(ids, steps))


def test_generate_logprobs_agree_with_the_numpy_backend(stories):
    """Greedy, so the ids are the same (a sampled draw may flip between backends near a top-k
    cut: conformance.invariants.same_generations); logprobs within the model bound."""
    model, _ = stories
    got = slimllm.generate(model, backend="jax", logprobs=4, **OPTIONS)
    want = slimllm.generate(model, backend="numpy", logprobs=4, **OPTIONS)
    assert got.ids == want.ids
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert [[i for i, _ in s.top] for s in a] == [[i for i, _ in s.top] for s in b]
        bound = ACROSS_BACKENDS["float32"]
        assert_close([s.logprob for s in a], [s.logprob for s in b], bound, "chosen")
        assert_close(
            [[lp for _, lp in s.top] for s in a], [[lp for _, lp in s.top] for s in b], bound
        )


def test_generate_logprobs_options(stories):
    model, _ = stories
    base = dict(ids=[1], max_new_tokens=2, backend="jax", cache_len=256)
    out = slimllm.generate(model, logprobs=0, **base)  # n = 0: the chosen id's logprob only
    assert [s.top for s in out.logprobs[0]] == [(), ()] and out.logprobs[0][0].logprob < 0
    assert slimllm.generate(model, **base).logprobs == []
    for bad in (True, -1, 21, 1.5, "2"):
        with pytest.raises(OptionError, match="logprobs must be None or an integer in"):
            slimllm.generate(model, logprobs=bad, **base)
    with pytest.raises(OptionError, match="logits need mode='stream'"):
        slimllm.generate(model, logprobs=2, mode="loop", **base)
