"""The whole JAX model against the reference on drawn configs, and prefill == decode steps in
JAX, for every cache dtype and attention kind.

One drawn config per example (any feature combination, tiny shapes), with weights by seed,
ragged prompts that respect it and teacher-forced continuations. Both backends prefill the
prompts as one padded chunk and decode the continuations step by step; every logit agrees
within `ACROSS_BACKENDS` of the cache dtype (a lossy cache is compared against the reference
with the same dtype: both store the same rounded values up to one storage step). The JAX runner
then checks prefill == single steps on the same rows, reusing the two compiled programs
(chunk [b, 16] and step [b, 1]) the comparison built, so each example costs two compiles.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimllm.conformance import profiles
from slimllm.conformance import strategies as S
from slimllm.conformance.invariants import (
    JaxRunner,
    NumpyRunner,
    backends_agree,
    prefill_equals_steps,
)
from slimllm.jaxbackend.engine import Engine
from slimllm.reference.config import DynamicNTK

COMBOS = [(dtype, kind) for dtype in S.KV_DTYPES for kind in S.ATTENTION_KINDS]


@pytest.mark.parametrize("kv_dtype, attention", COMBOS)
@profiles.compiling(15)
@given(data=st.data())
def test_jax_model_matches_reference_and_prefill_equals_steps(kv_dtype, attention, data):
    cfg = data.draw(S.configs(), label="cfg")
    params = data.draw(S.params(cfg), label="params")
    runtime = data.draw(S.runtimes(attention, kv_dtype), label="runtime")
    prompts = data.draw(S.prompts(cfg, batch=(1, 2, 3)), label="prompts")
    continuations = data.draw(S.continuations(len(prompts), 4), label="continuations")
    jax_runner = JaxRunner(Engine(params, cfg))
    backends_agree(
        NumpyRunner(params, cfg), jax_runner, prompts, continuations, runtime, pad_to=S.PAD_TO
    )
    if not isinstance(cfg.rope_scaling, DynamicNTK):
        rows = [p + c for p, c in zip(prompts, continuations, strict=True)]
        prefill_equals_steps(jax_runner, rows, runtime, pad_to=S.PAD_TO)
