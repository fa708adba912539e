"""Generation loop: stopping rules, seeded repeatability, ragged batches."""

import pytest

from slimllm.reference.config import ModelConfig
from slimllm.reference.generate import Stopping, generate
from slimllm.reference.params import init_params
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import SamplingConfig

CFG = ModelConfig(
    vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=48, max_len=64
)
PARAMS = init_params(CFG, seed=3)
SAMPLED = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)


def run(prompts, n=8, sampling=SamplingConfig(), seeds=0, **stop):
    return generate(PARAMS, CFG, prompts, Stopping(max_new_tokens=n, **stop), sampling, seeds)


def test_ragged_batch_rows_equal_rows_alone():
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    for sampling in (SamplingConfig(), SAMPLED):
        batch = run(prompts, sampling=sampling, seeds=[11, 12, 13])
        for r, p in enumerate(prompts):
            alone = run([p], sampling=sampling, seeds=[11 + r])
            assert batch.rows[r].ids == alone.rows[0].ids


def test_seeded_sampling_repeats_and_seeds_differ():
    a = run([[1, 2]], n=16, sampling=SAMPLED, seeds=5).rows[0].ids
    assert run([[1, 2]], n=16, sampling=SAMPLED, seeds=5).rows[0].ids == a
    assert run([[1, 2]], n=16, sampling=SAMPLED, seeds=6).rows[0].ids != a


def test_eos_and_stop_sequences_end_rows():
    free = run([[1, 2]], n=8).rows[0]
    assert free.finish_reason == "length" and len(free.ids) == 8
    eos = free.ids[3]
    row = run([[1, 2]], n=8, eos_ids=(eos,)).rows[0]
    assert row.finish_reason == "eos" and row.ids == free.ids[: free.ids.index(eos) + 1]
    seq = tuple(free.ids[4:6])
    row = run([[1, 2]], n=8, stop_sequences=(seq,)).rows[0]
    assert row.finish_reason == "stop" and tuple(row.ids[-2:]) == seq


def test_stop_strings_use_the_decoder():
    free = run([[1, 2]], n=8).rows[0]
    decode = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    row = run([[1, 2]], n=8, stop_strings=(f"t{free.ids[2]}",), decode=decode).rows[0]
    assert row.finish_reason == "stop" and len(row.ids) <= 3


def test_on_token_streams_every_id_in_order():
    seen = []
    result = generate(
        PARAMS,
        CFG,
        [[1, 2], [3]],
        Stopping(max_new_tokens=5),
        on_token=lambda r, t: seen.append((r, t)),
    )
    for r in range(2):
        assert [t for rr, t in seen if rr == r] == result.rows[r].ids


def test_prompt_longer_than_context_or_cache():
    with pytest.raises(ValueError, match="longer than the model's context 64"):
        run([[1] * 65], n=1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run([[1] * 60], n=10)
    with pytest.raises(ValueError, match="longer than the cache"):
        generate(
            PARAMS, CFG, [[1] * 10], Stopping(max_new_tokens=10), rt=Runtime("numpy", cache_len=12)
        )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run([[1, 64]])
    with pytest.raises(ValueError, match="at least one token"):
        run([[]])
