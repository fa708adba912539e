"""The NumPy reference end to end against upstream outputs, through the public `slimllm.load`
path a user calls (the JAX backend's twin of this file is tests/jaxbackend/test_jax_oracles.py).

stories260K: a trained llama2.c checkpoint, oracle from HF LlamaForCausalLM. Fixtures: tiny
random checkpoints in hub format with logits and greedy ids from the upstream implementation.
Bounds: logits within 1e-4 relative (max abs diff / max abs logit), greedy ids exact. Generation
runs with backend="numpy": `slimllm.generate`'s default is the JAX backend.
"""

import numpy as np
import pytest

import slimllm
from conftest import FIXTURES, VARIANTS, rel_err


def test_stories_greedy_200(stories):
    model, oracle = stories
    out = slimllm.generate(
        model,
        ids=oracle["prompt_a"].tolist(),
        max_new_tokens=len(oracle["greedy_a"]),
        backend="numpy",
        return_logits=True,
    )
    assert out.ids[0] == oracle["greedy_a"].tolist()
    assert rel_err(out.logits[0], oracle["logits_greedy_a"]) < 1e-4


@pytest.mark.parametrize("key", ["b", "long"])
def test_stories_full_sequence_logits(stories, key):
    model, oracle = stories
    prompt = oracle["prompt_b" if key == "b" else "seq_long"]
    logits = forward_logits(model, prompt)
    assert rel_err(logits, oracle[f"logits_{key}"]) < 1e-4


def forward_logits(model, prompt):
    """Logits at every position of one prompt, from one prefill."""
    from slimllm.reference import kv_cache, positions
    from slimllm.reference.model import forward

    cfg = model.cfg
    state = positions.start_state(cfg, [prompt])
    cache = kv_cache.init_cache(cfg, 1, len(prompt))
    logits, _ = forward(model.params, cfg, np.asarray(prompt)[None], cache, state)
    return logits[0]


@pytest.fixture(scope="module", params=VARIANTS)
def fixture(request):
    path = FIXTURES / request.param
    return request.param, slimllm.load(path), np.load(path / "oracle.npz")


def test_fixture_logits(fixture):
    name, model, oracle = fixture
    for key in "abc" if "prompt_c" in oracle else "ab":  # qwen1_ntk adds a longer prompt_c
        err = rel_err(
            forward_logits(model, oracle[f"prompt_{key}"].tolist()), oracle[f"logits_{key}"]
        )
        assert err < 1e-4, f"{name} prompt_{key}: relative error {err:.2e}"


def test_fixture_greedy(fixture):
    name, model, oracle = fixture
    out = slimllm.generate(
        model,
        ids=oracle["prompt_a"].tolist(),
        eos_ids=(),
        max_new_tokens=len(oracle["greedy_a"]),
        backend="numpy",
        return_logits=True,
    )
    assert out.ids[0] == oracle["greedy_a"].tolist(), name
    assert rel_err(out.logits[0], oracle["logits_greedy_a"]) < 1e-4
