"""Hostile and broken arguments at the API and the command line (issue 14): every bad argument
is a `SlimllmError` naming it, the same in both backends, and on the command line exit status 2
with one line on stderr; the values that were accepted with a wrong result are refused, tiny
temperatures are greedy in both backends, and `eval` never calls non-finite logits agreement.
"""

import contextlib
import functools
import io
import json

import numpy as np
import pytest
from fuzz.harness import bounded, outcome
from hypothesis import given
from hypothesis import strategies as st

import slimllm
from conftest import FIXTURES, STORIES
from slimllm.cli import dumps, main
from slimllm.conformance.profiles import fuzzing
from slimllm.diff import compare as diff_compare
from slimllm.evaluate import compare
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError, SlimllmError
from slimllm.reference.runtime import Runtime
from slimllm.reference.sampling import GREEDY_BELOW

BACKENDS = ("numpy", "jax")
MODEL = str(STORIES / "stories260K.bin")

# Each bad keyword argument of `slimllm.generate`, with what its message must say.
BAD_ARGUMENTS = [
    (dict(ids=[1.7]), "ids must be token ids (integers >= 0), got 1.7"),  # was truncated to 1
    (dict(ids=["1"]), "ids must be token ids (integers >= 0), got '1'"),  # was read as 1
    (dict(ids=[True]), "ids must be token ids"),
    (dict(ids=[-1]), "ids must be token ids"),
    (dict(ids=[[1], [2.0]]), "ids must be token ids"),
    (dict(ids="1"), "ids must be a list of token ids"),
    (dict(ids=5), "ids must be a list of token ids"),
    (dict(ids=[9999]), "token id 9999 is outside the vocabulary [0, 512)"),
    (dict(seed=1.5), "seed must be an integer in [-2**63, 2**64)"),  # was accepted
    (dict(seed=2**64), "seed must be an integer in [-2**63, 2**64)"),  # OverflowError
    (dict(seed=-(2**63) - 1), "seed must be an integer"),
    (dict(seed="1"), "seed must be an integer"),
    (dict(seed=[1, 2]), "or a list of 1, one per row"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1, got 2.5"),  # TypeError
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(top_k=2.5, temperature=1.0), "top_k must be an integer >= 0, got 2.5"),  # TypeError
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number > 0"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(min_p=float("inf")), "min_p must be a finite number"),
    (dict(mode="foo"), "unknown generation mode 'foo'"),  # NumPy ignored it
    (dict(mode="loop", on_token=print), "callbacks, stop strings and logits need mode='stream'"),
    (dict(eos_ids=["x"]), "eos_ids must be token ids (integers >= 0), got 'x'"),  # NumPy: ignored
    (dict(eos_ids=5), "eos_ids must be a sequence of token ids"),
    (dict(stop=[[1, "a"]]), "stop must be token ids"),
    (dict(stop=[1.5]), "stop must be a sequence of token ids"),
    (dict(stop=5), "stop must be a list of strings or token-id lists"),
    (dict(stop=["\udcff"]), "stop is not valid UTF-8 text"),
    (dict(tp=0), "tp must be an integer >= 1, got 0"),  # NumPy: ignored
    (dict(tp=-1), "tp must be an integer >= 1, got -1"),
    (dict(tp=1.0), "tp must be an integer >= 1"),
    (dict(attention="paged"), "unknown attention 'paged'"),
    (dict(cache_len=2**31), "cache_len 2147483648 exceeds the model's context 512"),  # 37 GB
    (dict(weights="int4"), "weights int4: weight group 32 does not divide rows of 172 values"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs, message", BAD_ARGUMENTS, ids=[repr(k)[:40] for k, _ in BAD_ARGUMENTS]
)
def test_each_bad_api_argument_is_a_slimllm_error_in_both_backends(
    stories, backend, kwargs, message
):
    model, _ = stories
    kwargs = {"ids": [1], "max_new_tokens": 3, **kwargs}
    with pytest.raises(OptionError) as info:
        slimllm.generate(model, backend=backend, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_prompt_text_is_refused_before_the_tokenizer(stories, backend):
    """Text with surrogate escapes (undecodable bytes on a command line) or text that is not a
    str is refused by name, before any tokenizer sees it (one raised TypeError from inside)."""
    model, _ = stories
    for prompt, message in (
        ("\udcff", "prompt is not valid UTF-8 text"),
        (["ok", "\udcffx"], "prompt is not valid UTF-8 text"),
        (5, "prompt must be a str or a list of str"),
        ([b"hi"], "prompt must be text"),
    ):
        with pytest.raises(OptionError, match=message):
            slimllm.generate(model, prompt, max_new_tokens=2, backend=backend)


def test_numpy_integers_are_integers_and_give_the_same_ids(stories):
    """NumPy ints and arrays are accepted wherever Python ints are, with identical results."""
    model, oracle = stories
    plain = dict(ids=[1], max_new_tokens=np.int64(5), seed=np.uint64(3), top_k=np.int32(0))
    for backend in BACKENDS:
        out = slimllm.generate(model, backend=backend, **plain)
        assert out.ids[0] == oracle["greedy_a"][:5].tolist(), backend
    rows = slimllm.generate(model, ids=np.array([[1], [1]]), max_new_tokens=5, backend="numpy")
    assert rows.ids == [out.ids[0]] * 2


def test_every_64_bit_seed_is_one_key_in_both_backends(stories):
    """Seeds are 64-bit keys: 2**63 (an OverflowError before) is the key of -2**63, and 2**64 - 1
    the key of -1, in both backends."""
    model, _ = stories
    run = dict(ids=[1], max_new_tokens=8, temperature=1.0)
    ids = {}
    for backend in BACKENDS:
        for seed in (2**63, -(2**63), 2**64 - 1, -1):
            out = slimllm.generate(model, seed=seed, backend=backend, **run)
            ids[backend, seed] = out.ids[0]
    for backend in BACKENDS:
        assert ids[backend, 2**63] == ids[backend, -(2**63)]
        assert ids[backend, 2**64 - 1] == ids[backend, -1] != ids[backend, 2**63]
    assert ids["numpy", 2**63] == ids["jax", 2**63]


def test_tiny_temperatures_are_greedy_in_both_backends(stories):
    """At 1e-30 JAX drew [0, 0, 255]-like ids while NumPy gave the greedy ones; below
    GREEDY_BELOW both are greedy, whatever the seed."""
    model, oracle = stories
    greedy = oracle["greedy_a"][:12].tolist()
    for backend in BACKENDS:
        for temperature in (1e-30, GREEDY_BELOW / 2):
            out = slimllm.generate(
                model, ids=[1], max_new_tokens=12, temperature=temperature, seed=7, backend=backend
            )
            assert out.ids[0] == greedy, (backend, temperature)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


G = ["generate", "--model", "STORIES", "--max-new-tokens", "3"]

# Each command-line case of the issue (and its neighbours), with what the one line must say.
BAD_COMMAND_LINES = [
    ([*G, "--ids", "1", "--seed", str(2**64)], "seed must be an integer in [-2**63, 2**64)"),
    ([*G, "--ids", "1", "--seed", str(-(2**63) - 1)], "seed must be an integer"),
    ([*G, "--prompt", "\udcff"], "--prompt is not valid UTF-8 text"),
    ([*G, "--ids", "1", "--stop", "a\udcff"], "--stop is not valid UTF-8 text"),
    ([*G, "--ids", "1", "--temperature", "nan"], "temperature must be a finite number >= 0"),
    ([*G, "--ids", "1", "--temperature", "inf"], "temperature must be a finite number >= 0"),
    ([*G, "--ids", "1", "--repetition-penalty", "nan"], "repetition_penalty must be a finite"),
    ([*G, "--ids", "1", "--top-p", "nan"], "top_p must be a finite number in (0, 1]"),
    ([*G, "--ids", "1", "--min-p=-inf"], "min_p must be a finite number in [0, 1]"),
    ([*G, "--ids", "1", "--top-k", "-2"], "top_k must be an integer >= 0, got -2"),
    ([*G, "--ids", "1", "--stop-ids", ""], "--stop-ids is empty"),
    ([*G, "--ids", "1", "--stop-ids", "1,a"], "--stop-ids expects comma-separated integers"),
    ([*G, "--ids", "-3"], "ids must be token ids (integers >= 0), got -3"),
    ([*G, "--ids", "1", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    ([*G, "--ids", "1", "--tp", "0", "--backend", "numpy"], "tp must be an integer >= 1, got 0"),
    ([*G, "--ids", "1", "--tp", "-1", "--backend", "numpy"], "tp must be an integer >= 1"),
    ([*G, "--ids", "1", "--tp", "0"], "tp must be an integer >= 1, got 0"),
    ([*G, "--ids", "1", "--tp", "3"], "tp=3 does not divide the 8 query heads"),
    (
        [*G, "--ids", "1", "--tp", "2", "--weights", "int4", "--weight-group", "4"],
        "tp=2 splits the 172 input columns of w_down inside a weight group of 4",
    ),
    (["eval", "--model", "STORIES", "--ids", "9999", "--length", "20"], "outside the vocabulary"),
    (["eval", "--model", "STORIES", "--seed", str(2**64), "--length", "8"], "seed must be"),
    (["eval", "--model", "STORIES", "--text", "\udcff"], "no tokenizer"),
    (["eval", "--model", "STORIES", "--greedy-tokens", "0"], "--greedy-tokens >= 1"),
    (["diff", "--model", "STORIES", "--ids", "9999"], "outside the vocabulary [0, 512)"),
    (["diff", "--model", "STORIES", "--ids", "1,2", "--b", "jax:tp0"], "tp must be an integer"),
    (["diff", "--model", "STORIES", "--ids", "1,2", "--tol", "nan"], "tol must be a finite number"),
    (["memory", "--model", "STORIES", "--memory", "nan"], "--memory must be a positive number"),
    (
        ["generate", "--model", "CHATGLM", "--ids", "1,2", "--backend", "numpy"],
        "prompt row 0 lacks the block start token 252",  # positions' ValueError, a traceback now
    ),
]


@pytest.mark.parametrize(
    "argv, message", BAD_COMMAND_LINES, ids=[" ".join(a[5:] or a[:3]) for a, _ in BAD_COMMAND_LINES]
)
def test_each_bad_command_line_exits_2_with_one_line(capsys, argv, message):
    names = {"STORIES": MODEL, "CHATGLM": str(FIXTURES / "chatglm6b")}
    code, out, err = run(capsys, *[names.get(a, a) for a in argv])
    assert code == 2
    assert err.startswith("slimllm: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_missing_oracle_extra_and_unreadable_ids_file_are_one_line(capsys, monkeypatch, tmp_path):
    """Two mistakes whose ValueError the CLI no longer catches as such: `--against hf` without
    torch/transformers, and an --ids-file that is not text (UnicodeDecodeError)."""
    monkeypatch.setattr("slimllm.diff.find_spec", lambda name: None)
    code, _, err = run(capsys, "diff", "--model", MODEL, "--ids", "1,2", "--against", "hf")
    assert code == 2 and err.count("\n") == 1
    assert "--against hf needs torch and transformers (the oracle extra)" in err
    ids = tmp_path / "ids.bin"
    ids.write_bytes(b"\xff\xfe1 2")
    code, _, err = run(capsys, "eval", "--model", MODEL, "--ids-file", str(ids))
    assert code == 2 and err.count("\n") == 1
    assert "expected whitespace or comma separated token ids" in err


def test_no_arguments_print_the_help_and_exit_2(capsys):
    """It printed one line ("the following arguments are required") and no usage."""
    code, out, err = run(capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: slimllm") and "generate" in err and "eval" in err


def test_a_seed_of_2_to_the_63_runs_on_the_command_line(capsys):
    """2**63 (an OverflowError traceback before) is a valid 64-bit key: the key of -2**63."""
    argv = [*G, "--ids", "1", "--temperature", "1", "--json", "--backend", "numpy"]
    argv = [MODEL if a == "STORIES" else a for a in argv]
    results = [json.loads(run(capsys, *argv, "--seed", str(s))[1]) for s in (2**63, -(2**63))]
    assert results[0]["ids"] == results[1]["ids"] and len(results[0]["ids"]) == 3


def test_json_output_is_strict_with_non_finite_values_as_null():
    text = dumps({"kl": {"max": float("inf"), "mean": float("nan")}, "ids": [1, 2], "x": 0.5})
    assert json.loads(text) == {"kl": {"max": None, "mean": None}, "ids": [1, 2], "x": 0.5}


TINY = ModelConfig(
    vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=48, max_len=64
)


def broken_model(value: float) -> slimllm.Model:
    """A tiny random model with one attention output weight set to `value`."""
    model = slimllm.demo_model(TINY, seed=1)
    model.params.layers[0].wo[0, 0] = value
    return model


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in --json output: not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_eval_refuses_a_baseline_with_non_finite_logits(capsys, monkeypatch):
    """A NaN weight made every logit NaN, and eval reported top-1 agreement 1.0 and printed a
    bare NaN in --json output: now it is an error, in the API and on the command line."""
    model = broken_model(np.nan)
    tokens = list(range(1, 21))
    for backend in BACKENDS:
        with pytest.raises(SlimllmError, match="gives non-finite logits at 20 of 20 positions"):
            compare(model, tokens, 4, Runtime(backend), greedy_tokens=2)
    monkeypatch.setattr("slimllm.commands.load", lambda path: model)
    argv = ["eval", "--model", "nan-model", "--ids", "1", "--length", "12", "--greedy-tokens", "2"]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("slimllm: error: the baseline (numpy:naive:float32:wfloat32) gives ")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the float16 overflow is the point
def test_eval_counts_a_settings_non_finite_logits_as_disagreement(capsys, monkeypatch):
    """A weight of 1e6 is finite in float32 but infinite in float16: the float16 setting's
    logits are not finite, so they never agree, their KL is infinite, and --json says null."""
    model = broken_model(1e6)
    tokens = list(range(1, 21))
    report = compare(model, tokens, 4, Runtime("numpy", weights="float16"), greedy_tokens=2)
    assert report["nonfinite_positions"] > 0
    assert report["top1_agreement"] <= 1 - report["nonfinite_positions"] / 20
    assert report["kl"]["max"] == np.inf
    monkeypatch.setattr("slimllm.commands.load", lambda path: model)
    argv = ["eval", "--model", "big-weight", "--ids", "1", "--length", "20", "--backend", "numpy"]
    code, out, err = run(capsys, *argv, "--weights", "float16", "--greedy-tokens", "2", "--json")
    assert code == 0, err
    result = strict_json(out)
    assert result["nonfinite_positions"] > 0 and result["kl"]["max"] is None
    assert result["top1_agreement"] < 1


# ---------------------------------------------------------------- fuzz targets

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.integers(-3, 80), max_size=3),
    st.lists(st.one_of(st.floats(), st.text(max_size=2), st.booleans()), min_size=1, max_size=2),
    st.sampled_from([np.int64(2), np.uint64(2**63), np.float32("nan"), np.array([1, 2]), [[1]]]),
    st.sampled_from(["loop", "stream", "slim", "flash", "int8", "int4", "bfloat16", "float16"]),
)
OPTIONS = (
    "ids",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "eos_ids",
    "stop",
    "mode",
    "attention",
    "kv_dtype",
    "weights",
    "weight_group",
    "cache_len",
)


@fuzzing()
@given(st.dictionaries(st.sampled_from(OPTIONS), HOSTILE, min_size=1, max_size=3))
def test_fuzz_generate_arguments(kwargs):
    """Any values of generate's arguments: a result within its bounds, or a one-line
    SlimllmError, the same one in both backends (the error path compiles nothing)."""
    model = fuzz_model()
    kwargs = {"ids": [1], "max_new_tokens": 2, **kwargs}
    message, out = outcome(slimllm.generate, model, backend="numpy", **kwargs)
    if message is None:
        for row in out.ids:
            assert 1 <= len(row) <= int(kwargs["max_new_tokens"])
            assert all(0 <= t < TINY.vocab for t in row)
        return
    assert outcome(slimllm.generate, model, backend="jax", **kwargs)[0] == message


@functools.cache
def fuzz_model() -> slimllm.Model:
    return slimllm.demo_model(TINY, seed=2)


OPTION_TEXT = st.one_of(
    st.sampled_from(
        ["nan", "inf", "-inf", "1e-30", "0", "-1", "1e400", "2.5", "", "1,a", ",", str(2**64)]
    ),
    st.text(max_size=4),
)
CLI_OPTIONS = (
    "--temperature",
    "--top-k",
    "--top-p",
    "--min-p",
    "--repetition-penalty",
    "--seed",
    "--ids",
    "--stop-ids",
    "--stop",
    "--prompt",
)


@fuzzing()
@given(st.dictionaries(st.sampled_from(CLI_OPTIONS), OPTION_TEXT, min_size=1, max_size=3))
def test_fuzz_generate_options_on_the_command_line(options):
    """Any text for generate's options: exit 0, or exit 2 with one `slimllm: error:` line."""
    argv = ["generate", "--model", MODEL, "--backend", "numpy", "--max-new-tokens", "2"]
    argv += ["--json", *(f"{name}={value}" for name, value in options.items())]
    if "--prompt" not in options and "--ids" not in options:
        argv.append("--ids=1")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code == 0:
        assert len(json.loads(out.getvalue())["ids"]) <= 2
    else:
        text = err.getvalue()
        assert code == 2 and text.startswith("slimllm: error: ") and text.count("\n") == 1, text


def test_diff_never_calls_non_finite_intermediates_agreement():
    """NaN on both sides compared as 'no intermediate exceeds the tolerance' (NaN > tol is
    False): now the row exceeds from the first position that holds one, errors infinite."""
    a = {"embed": np.array([[1.0, 2.0], [np.nan, 1.0], [1.0, 1.0]])}
    for b in (a, {"embed": np.array([[1.0, 2.0], [1.0, np.inf], [1.0, 1.0]])}):
        report = diff_compare(a, b, 1e-4)
        row = report["first"]
        assert row is not None and row["exceeds"] and row["first_position"] == 1
        assert json.loads(dumps(report))["rows"][0]["rel"] is None
    with pytest.raises(OptionError, match="tol must be a finite number > 0"):
        diff_compare(a, a, float("nan"))


def test_a_huge_cache_len_is_refused_before_any_allocation():
    """cache_len=2**40 asked NumPy for a 256 TiB cache (MemoryError, or swapping where memory is
    overcommitted); it is refused from the numbers alone, fast and small."""
    code = (
        "import slimllm\n"
        "from slimllm.reference.config import ModelConfig\n"
        "cfg = ModelConfig(vocab=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,"
        " ffn_width=48, max_len=64)\n"
        "try:\n"
        "    slimllm.generate(slimllm.demo_model(cfg), ids=[1], max_new_tokens=2, cache_len=2**40,"
        " backend='numpy')\n"
        "except slimllm.SlimllmError as e:\n"
        "    print(e)\n"
    )
    run = bounded(code, seconds=2.0, address_gb=4.0)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "cache_len 1099511627776 exceeds the model's context 64"
    assert run.seconds < 2.0 and run.peak_mb < 200, (run.seconds, run.peak_mb)
