"""The command line: JSON output, streaming, and one clear line for every user mistake."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import slimllm
from conftest import FIXTURES, STORIES, VARIANTS
from slimllm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_stories_greedy_json(capsys):
    model = STORIES / "stories260K.bin"
    oracle = np.load(STORIES / "oracle.npz")
    code, out, err = run(
        capsys, "generate", "--model", str(model), "--ids", "1", "--max-new-tokens", "200", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["ids"] == oracle["greedy_a"].tolist()
    assert result["finish_reason"] == "length" and result["prompt_ids"] == [1]


def test_generate_streams_ids_without_tokenizer(capsys):
    model = STORIES / "stories260K.bin"
    code, out, _ = run(
        capsys, "generate", "--model", str(model), "--ids", "1", "--max-new-tokens", "5"
    )
    assert code == 0
    oracle = np.load(STORIES / "oracle.npz")
    assert out.split() == [str(i) for i in oracle["greedy_a"][:5]]


def test_sampling_options_are_seeded(capsys):
    model = str(STORIES / "stories260K.bin")
    args = [
        "generate",
        "--model",
        model,
        "--ids",
        "1,2",
        "--max-new-tokens",
        "20",
        "--json",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.1",
    ]
    a = json.loads(run(capsys, *args, "--seed", "1")[1])["ids"]
    assert json.loads(run(capsys, *args, "--seed", "1")[1])["ids"] == a
    assert json.loads(run(capsys, *args, "--seed", "2")[1])["ids"] != a


def test_beam_search_options(capsys):
    model = str(STORIES / "stories260K.bin")
    args = ["generate", "--model", model, "--ids", "1,2", "--max-new-tokens", "12", "--json"]
    beams = ["--num-beams", "3", "--length-penalty", "0.5", "--early-stopping", "never"]
    code, out, err = run(capsys, *args, *beams)
    assert code == 0, err
    result = json.loads(out)
    want = slimllm.generate(
        slimllm.load(model),
        ids=[1, 2],
        max_new_tokens=12,
        num_beams=3,
        length_penalty=0.5,
        early_stopping="never",
        backend="numpy",
    )
    assert result["ids"] == want.ids[0]  # the JAX backend, as the reference chooses
    assert result["score"] == pytest.approx(want.scores[0], abs=1e-4)
    greedy = json.loads(run(capsys, *args)[1])
    assert "score" not in greedy


def test_demo_runs_on_the_embedded_model(capsys):
    code, out, err = run(capsys, "demo", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["ids"]) == 3 and result["tokens_per_second"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/no/such/dir", "--ids", "1"], "no such file or directory"),
        (["generate", "--ids", "1"], "required: --model"),
        (["generate", "--model", "STORIES", "--ids", "1,a"], "comma-separated integers"),
        (["generate", "--model", "STORIES"], "give --prompt TEXT or --ids"),
        (["generate", "--model", "STORIES", "--prompt", "hi"], "no tokenizer"),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--max-new-tokens", "600"],
            "exceeds the model's context 512",
        ),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--top-p", "2"],
            "top_p must be a finite number in (0, 1]",
        ),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--max-new-tokens", "abc"],
            "invalid int value",
        ),
        (["generate", "--model", "STORIES", "--ids", "9999"], "outside the vocabulary"),
        (["generate", "--model", "STORIES", "--ids", "1", "--backend", "cuda"], "invalid choice"),
        (["generate", "--model", "STORIES", "--ids", "1", "--weights", "int3"], "invalid choice"),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--weights", "int4"],
            "weight group 32 does not divide rows of 172 values",  # stories' ffn width is 172
        ),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--weights", "int8", "--weight-group"]
            + ["0"],
            "weight_group must be a positive integer",
        ),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--weight-group", "4"],
            "a weight group needs a quantised weight format",
        ),
        (
            ["demo", "--weights", "bfloat16", "--weight-group", "4"],
            "a weight group needs a quantised weight format",
        ),
        (["demo", "--random", "--prompt", "hi"], "has no tokenizer: give --ids instead"),
        (["frobnicate"], "invalid choice"),
        (["generate", "--model", "STORIES", "--ids", "1", "--num-beams", "0"], "num_beams must"),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--num-beams", "2", "--top-k", "5"],
            "top_k is a sampling setting",
        ),
        (
            ["generate", "--model", "STORIES", "--ids", "1", "--early-stopping", "sometimes"],
            "invalid choice",
        ),
    ],
)
def test_user_mistakes_exit_2_with_one_line(capsys, argv, message):
    model = str(STORIES / "stories260K.bin")
    code, out, err = run(capsys, *[model if a == "STORIES" else a for a in argv])
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_weights_option_loads_that_format(capsys, stories):
    model, oracle = stories
    argv = ["generate", "--model", str(STORIES / "stories260K.bin"), "--ids", "1", "--json"]
    argv += ["--max-new-tokens", "30", "--backend", "numpy"]
    code, out, err = run(capsys, *argv, "--weights", "float32")
    assert code == 0, err
    assert json.loads(out)["ids"] == oracle["greedy_a"][:30].tolist()  # float32 is the default
    code, out, err = run(capsys, *argv, "--weights", "int4", "--weight-group", "4")
    assert code == 0, err
    result = json.loads(out)
    assert result["weights"] == "int4" and result["weight_group"] == 4
    int4 = slimllm.load(STORIES / "stories260K.bin", weights="int4", group=4)
    expected = slimllm.generate(int4, ids=[1], max_new_tokens=30, backend="numpy")
    assert result["ids"] == expected.ids[0]


def test_demo_runs_in_a_weight_format(capsys):
    argv = ["demo", "--max-new-tokens", "3", "--backend", "numpy", "--weights", "int4", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["weights"] == "int4" and len(json.loads(out)["ids"]) == 3


def test_console_script_is_installed():
    exe = shutil.which("slimllm") or [sys.executable, "-m", "slimllm.cli"]
    cmd = [exe] if isinstance(exe, str) else exe
    proc = subprocess.run(
        [*cmd, "demo", "--max-new-tokens", "2", "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["ids"]) == 2


def test_generate_works_for_every_fixture_family(capsys):
    for path in (FIXTURES / name for name in VARIANTS):
        oracle = np.load(path / "oracle.npz")
        ids = ",".join(str(i) for i in oracle["prompt_a"])
        code, out, err = run(
            capsys,
            "generate",
            "--model",
            str(path),
            "--ids",
            ids,
            "--no-eos",
            "--max-new-tokens",
            str(len(oracle["greedy_a"])),
            "--json",
        )
        assert code == 0, (path.name, err)
        assert json.loads(out)["ids"] == oracle["greedy_a"].tolist(), path.name
