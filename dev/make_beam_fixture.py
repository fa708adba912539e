"""Write tests/data/fixtures/beam/beam.json: Hugging Face transformers' own beam search on fixture
checkpoints, the oracle of slimllm's beam search (reference/beam.py, jaxbackend/beam.py).

For each case (a fixture, its prompt_a, num_beams, length_penalty, early_stopping, EOS ids,
repetition_penalty, max_new_tokens) it runs `generate(num_beams=m, num_return_sequences=m,
do_sample=False, ...)` in float32 on one CPU thread and keeps all m finished hypotheses, best
first: their new ids (the length read off `beam_indices`) and `sequences_scores`. EOS ids are
the model's own, or distinct ids of its greedy continuation (`oracle.npz` greedy_a), so that
hypotheses end on EOS at different lengths. tests/reference/test_beam.py and
tests/jaxbackend/test_jax_beam.py compare both backends to the file, and the reference to
transformers live where it is installed (`run_case`).

    python dev/make_beam_fixture.py   # then update tests/data/fixtures/SHA256SUMS
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "fixtures"
OUT = FIXTURES / "beam"
VARIANTS = ("llama", "qwen2", "opt")  # native transformers classes of three families

# (num_beams, length_penalty, early_stopping, which EOS ids, repetition_penalty, max_new_tokens);
# EOS "model": the checkpoint's own; (i, ...): the i-th distinct id of greedy_a, for each i.
SETTINGS = (
    (3, 1.0, False, "model", 1.0, 12),  # the defaults
    (3, 0.5, True, (1,), 1.0, 10),
    (3, 2.0, "never", (1,), 1.3, 10),
    (4, -1.0, False, (1, 3), 1.0, 8),  # two EOS ids: 3 x num_beams candidates a step
    (4, 0.0, "never", (3,), 1.0, 9),
    (4, 1.0, True, (2,), 1.2, 9),
)


def cases() -> list[dict]:
    """Every (variant, setting) as the dict beam.json stores (without the expected output)."""
    out = []
    for variant in VARIANTS:
        oracle = np.load(FIXTURES / variant / "oracle.npz")
        config = json.loads((FIXTURES / variant / "generation_config.json").read_text())
        own = config["eos_token_id"]
        own = own if isinstance(own, list) else [own]
        greedy = list(dict.fromkeys(oracle["greedy_a"].tolist()))  # distinct, in order
        for num_beams, length_penalty, early, eos, penalty, max_new in SETTINGS:
            out.append(
                {
                    "variant": variant,
                    "prompt": oracle["prompt_a"].tolist(),
                    "num_beams": num_beams,
                    "length_penalty": length_penalty,
                    "early_stopping": early,
                    "eos_ids": own if eos == "model" else [greedy[i] for i in eos],
                    "repetition_penalty": penalty,
                    "max_new_tokens": max_new,
                }
            )
    return out


def run_case(case: dict, models: dict | None = None) -> list[dict]:
    """transformers' beam search on one case -> its hypotheses [{"ids", "score"}], best first
    (`models`: loaded checkpoints by variant, filled as they load)."""
    import torch
    import transformers

    torch.set_num_threads(1)
    models = {} if models is None else models
    if case["variant"] not in models:
        path = FIXTURES / case["variant"]
        models[case["variant"]] = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    model = models[case["variant"]]
    m, prompt = case["num_beams"], case["prompt"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            num_beams=m,
            num_return_sequences=m,
            length_penalty=case["length_penalty"],
            early_stopping=case["early_stopping"],
            eos_token_id=case["eos_ids"],
            pad_token_id=case["eos_ids"][0],
            repetition_penalty=case["repetition_penalty"],
            max_new_tokens=case["max_new_tokens"],
            return_dict_in_generate=True,
            output_scores=True,
        )
    lengths = (out.beam_indices >= 0).sum(-1).tolist()  # new ids of each hypothesis
    start = len(prompt)
    return [
        {
            "ids": out.sequences[i, start : start + lengths[i]].tolist(),
            "score": float(out.sequences_scores[i]),
        }
        for i in range(m)
    ]


def main() -> None:
    import torch
    import transformers

    models: dict = {}
    data = {
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "cases": [case | {"hypotheses": run_case(case, models)} for case in cases()],
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "beam.json").write_text(json.dumps(data, indent=1) + "\n")
    for case in data["cases"]:
        best = case["hypotheses"][0]
        ended = sum(h["ids"][-1] in case["eos_ids"] for h in case["hypotheses"])
        print(
            f"{case['variant']:6} m={case['num_beams']} lp={case['length_penalty']:4} "
            f"early={case['early_stopping']!s:5} eos={case['eos_ids']}: best {len(best['ids'])} "
            f"ids, score {best['score']:.4f}; {ended} of {case['num_beams']} end on EOS",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
