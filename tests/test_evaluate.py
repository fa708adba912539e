"""The accuracy harness, and the int8 cache's accuracy with a justified bound.

Bound: int8 (one scale per token and head) and bfloat16 both keep about 8 significant bits,
but int8's rounding step is amax/127 for every element of a head vector while bf16's is relative
to each element. The KL of two nearby distributions grows with the variance of the logit
perturbation, so the int8/bf16 KL ratio is about the ratio of noise variances,
4 * (amax^2 / mean x^2) ~ 4 * 2 ln(2d) ~ 15-22 for d = 8..32. We require int8's mean KL to be
within 25x bf16's on the same sequence, top-1 agreement >= 0.9, and perplexity within 2%.
Measured (closing note of the issue): ratios 3-11, top-1 >= 0.917, perplexity +0.5%.
(Weight formats have their bounds in test_weight_accuracy.py.)

The memory report counts weight bytes from a config alone; it is checked against the bytes of
weights actually encoded, and against a published count (Llama-3-8B).
"""

import json
import re

import numpy as np
import pytest

import slimllm
from conftest import FIXTURES, STORIES, VARIANTS
from slimllm.cli import main
from slimllm.evaluate import compare, memory_report, sample_sequence, weight_bytes_for
from slimllm.reference.params import init_params
from slimllm.reference.runtime import Runtime
from slimllm.reference.weight_format import WEIGHT_FORMATS, encode_params, weight_bytes
from slimllm.weights import load_config


def check_int8(model, seq, prompt_len, greedy_tokens):
    int8 = compare(
        model, seq, prompt_len, Runtime("numpy", kv_dtype="int8"), greedy_tokens=greedy_tokens
    )
    bf16 = compare(model, seq, prompt_len, Runtime("numpy", kv_dtype="bfloat16"), greedy_tokens=1)
    assert int8["kl"]["mean"] <= 25 * bf16["kl"]["mean"], (int8["kl"], bf16["kl"])
    assert int8["top1_agreement"] >= 0.9
    ppl = int8["perplexity"]
    assert abs(ppl["setting"] / ppl["baseline"] - 1) < 0.02
    return int8


def test_int8_on_the_trained_model(stories):
    model, _ = stories
    seq = sample_sequence(model, [1], 500, seed=0)
    report = check_int8(model, seq, 1, greedy_tokens=200)
    assert report["positions"] == 500 and report["greedy"]["tokens"] == 200


def test_int8_on_every_fixture_family():
    for path in (FIXTURES / name for name in VARIANTS):
        model = slimllm.load(path)
        prompt = np.load(path / "oracle.npz")["prompt_a"].tolist()
        check_int8(
            model, sample_sequence(model, prompt, 240, seed=0), len(prompt), greedy_tokens=20
        )


def test_identical_settings_report_zero_and_slim_is_exact(stories):
    model, _ = stories
    seq = sample_sequence(model, [1], 120, seed=1)
    same = compare(model, seq, 1, Runtime("numpy"), greedy_tokens=30)
    assert same["kl"]["max"] == 0 and same["top1_agreement"] == 1
    assert same["greedy"]["identical_prefix"] == 30
    slim = compare(model, seq, 1, Runtime("numpy", "slim"), greedy_tokens=30)
    assert slim["kl"]["max"] < 1e-8 and slim["greedy"]["identical_prefix"] == 30


def test_eval_and_kv_size_cli(capsys, tmp_path):
    model = str(STORIES / "stories260K.bin")
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i) for i in np.load(STORIES / "oracle.npz")["seq_long"][:60]))
    assert (
        main(
            [
                "eval",
                "--model",
                model,
                "--ids-file",
                str(ids),
                "--prompt-len",
                "4",
                "--kv-dtype",
                "int8",
                "--attention",
                "flash",
                "--greedy-tokens",
                "10",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["positions"] == 60 and report["setting"]["kv_dtype"] == "int8"
    assert set(report["kl"]) == {"mean", "p99", "max"} and 0 < report["kl"]["mean"] < 0.1
    assert main(["kv-size", "--model", model, "--context", "512", "--batch", "2", "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)["dtypes"]
    # stories260K: 5 layers, 4 kv heads, d = 8
    assert sizes["float32"]["bytes_per_token"] == 2 * 5 * 4 * 8 * 4
    assert sizes["int8"]["total_bytes"] == 2 * 5 * 4 * (8 + 4) * 512 * 2


def test_eval_compares_a_weight_format_with_float32_weights(capsys):
    model = str(STORIES / "stories260K.bin")
    argv = ["eval", "--model", model, "--backend", "numpy", "--length", "60", "--json"]
    assert main([*argv, "--greedy-tokens", "10", "--weights", "int8", "--weight-group", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["baseline"]["weights"] == "float32"
    assert report["setting"]["weights"] == "int8" and report["setting"]["weight_group"] == 4
    assert 0 < report["kl"]["mean"] < 0.1 and report["top1_agreement"] > 0.8
    assert main([*argv, "--greedy-tokens", "10", "--weights", "float32"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["kl"]["max"] == 0 and same["greedy"]["identical_prefix"] == 10


@pytest.mark.parametrize(
    "path", [FIXTURES / name for name in VARIANTS] + [STORIES / "stories260K.bin"]
)
def test_weight_bytes_from_a_config_are_the_encoded_bytes(path):
    cfg = load_config(path)
    params = init_params(cfg)
    for name, fmt in WEIGHT_FORMATS.items():
        for group in (None, 4):
            try:
                encoded = encode_params(params, fmt, group)
            except ValueError as err:  # stories260K in int4's default groups of 32: the same error
                with pytest.raises(ValueError, match=re.escape(str(err))):
                    weight_bytes_for(cfg, fmt, group)
                continue
            assert weight_bytes_for(cfg, fmt, group) == weight_bytes(encoded), (name, group)


# Llama-3-8B's config.json (the fields that set its shapes; the rest of the file changes nothing).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def test_memory_report_of_llama3_8b(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    argv = ["memory", "--model", str(tmp_path), "--context", "8192", "--batch", "4", "--json"]
    assert main(argv) == 0  # without --weights: the checkpoint's own, its config's torch_dtype
    report = json.loads(capsys.readouterr().out)
    assert report["weights"]["format"] == "bfloat16"
    # 8.03e9 parameters in bfloat16, plus the 65 RMSNorm weight vectors kept in float32
    assert report["parameters"] == 8_029_995_008
    assert report["weights"]["bytes"] == 2 * 8_029_995_008 + 4 * 65 * 4096
    assert round(report["weights"]["bytes"] / 1e9, 2) == 16.06
    # KV: 2 (K, V) x 32 layers x 8 kv heads x 128 x 2 bytes = 128 KiB per token
    kv = report["dtypes"]["bfloat16"]["total_bytes"]
    assert kv == 131072 * 8192 * 4 == 4 * 2**30
    total = report["totals"]["bfloat16"]
    assert total["bytes"] == report["weights"]["bytes"] + kv  # 20.36e9 B = 18.96 GiB
    assert total["fits_gib"] == 19
    formats = report["weight_formats"]
    assert formats["float32"]["bytes"] == 4 * 8_029_995_008 + 4 * 65 * 4096
    # int8: a byte per weight and a float32 scale per output row (43008 per layer, 128256 for
    # each of the embedding and the head); int4: half a byte and a float16 scale per 32 columns
    # in the projections (6_979_321_856 weights), the embedding and the head in int8.
    vectors, rows = 4 * 65 * 4096, 32 * 43008 + 2 * 128256
    assert formats["int8"]["bytes"] == 8_029_995_008 + 4 * rows + vectors
    tables = 2 * 128256 * 4096 + 4 * 2 * 128256
    assert formats["int4"]["bytes"] == 6_979_321_856 * (1 / 2 + 2 / 32) + tables + vectors
    assert main([*argv, "--weights", "int4", "--memory", "8"]) == 0
    small = json.loads(capsys.readouterr().out)["totals"]
    assert [small[k]["fits"] for k in ("float32", "bfloat16", "int8")] == [False, False, True]


def test_memory_report_names_unfit_groups_and_keeps_kv_size(capsys):
    model = str(STORIES / "stories260K.bin")
    assert main(["kv-size", "--model", model, "--json"]) == 0  # the first name still works
    report = json.loads(capsys.readouterr().out)
    assert "does not divide rows of 172" in report["weight_formats"]["int4"]["error"]
    assert report["weights"] == {"format": "float32", "group": None, "bytes": 1015.75 * 1024}
    assert main(["memory", "--model", model, "--weights", "int4", "--weight-group", "4"]) == 0
    out = capsys.readouterr().out
    assert "total with int4 weights" in out and "fits in 1 GiB" in out
    cfg = load_config(model)
    assert memory_report(cfg, 1, 1, "int4", 4)["weights"]["bytes"] < weight_bytes_for(
        cfg, WEIGHT_FORMATS["int8"], 4
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["kv-size", "--model", "/nope"], "no such file"),
        (["memory", "--model", "STORIES", "--weights", "int4"], "does not divide rows of 172"),
        (["memory", "--model", "STORIES", "--weight-group", "4"], "needs a quantised"),
        (["memory", "--model", "STORIES", "--memory", "0"], "--memory must be a positive number"),
        (["memory", "--model", "STORIES", "--memory", "nan"], "--memory must be a positive number"),
        (["eval", "--model", "STORIES", "--weights", "int4"], "does not divide rows of 172"),
        (["eval", "--model", "STORIES", "--kv-dtype", "int4"], "invalid choice"),
        (["eval", "--model", "STORIES", "--text", "hi"], "no tokenizer"),
        (
            ["eval", "--model", "STORIES", "--prompt-len", "900", "--length", "20"],
            "need a prompt of 1..19",
        ),
    ],
)
def test_eval_mistakes(capsys, argv, message):
    model = str(STORIES / "stories260K.bin")
    assert main([model if a == "STORIES" else a for a in argv]) == 2
    assert message in capsys.readouterr().err
