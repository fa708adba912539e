"""Hostile and broken config.json values (issue 14): each case found ends in one ConfigError line
naming the key, through the config-only path (`load_config`, `slimllm memory`/`kv-size`) and
the full load, where it used to be a traceback or a model that silently computed nonsense."""

import json
import math
import shutil

import pytest
from fuzz.harness import bounded

from conftest import FIXTURES, SHARED
from slimllm.cli import main
from slimllm.reference.errors import ConfigError
from slimllm.weights import load_checkpoint, load_config
from slimllm.weights.io import CheckpointError


def copy(tmp_path, variant, mutate):
    """A copy of a fixture whose config.json is `mutate(config)`."""
    d = tmp_path / variant
    shutil.copytree(FIXTURES / variant, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(mutate(config)))
    return d


def setting(**changes):
    return lambda config: {**config, **changes}


def refused(capsys, d, *words, error=ConfigError):
    """Every path refuses `d` with one `error` line holding each of `words`; the CLI exits 2
    with that line on stderr."""
    for load in (load_config, lambda path: load_checkpoint(path, tokenizer=False)):
        with pytest.raises(error) as e:
            load(d)
        message = str(e.value)
        assert "\n" not in message and all(w in message for w in words), message
    for command in ("memory", "kv-size"):
        assert main([command, "--model", str(d)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and all(w in err for w in words), err


def test_config_that_is_a_list(tmp_path, capsys):
    d = copy(tmp_path, "llama", lambda config: [config])
    refused(capsys, d, "config.json", "list", error=CheckpointError)


def test_zero_attention_heads(tmp_path, capsys):
    d = copy(tmp_path, "llama", setting(num_attention_heads=0))
    refused(capsys, d, "num_attention_heads=0", "expected an integer")


@pytest.mark.parametrize("width", ["64", 64.0, True, 10**30, 1e30], ids=repr)
def test_hidden_size_of_the_wrong_type_or_size(tmp_path, capsys, width):
    refused(capsys, copy(tmp_path, "llama", setting(hidden_size=width)), f"hidden_size={width!r}")


def test_llama3_rope_scaling_without_factor(tmp_path, capsys):
    def drop_factor(config):
        del config["rope_scaling"]["factor"]
        return config

    refused(capsys, copy(tmp_path, "llama31", drop_factor), "rope_scaling lacks factor")


def test_rope_scaling_as_a_list(tmp_path, capsys):
    d = copy(tmp_path, "llama31", lambda c: {**c, "rope_scaling": [c["rope_scaling"]]})
    refused(capsys, d, "rope_scaling=", "expected an object")


@pytest.mark.parametrize("eps", [-1, 0, math.nan, math.inf, 2.0], ids=repr)
def test_rms_norm_eps_out_of_range(tmp_path, capsys, eps):
    """-1 used to load and generate token 0 forever."""
    refused(capsys, copy(tmp_path, "llama", setting(rms_norm_eps=eps)), "rms_norm_eps=")


@pytest.mark.parametrize(
    "variant, changes",
    [
        ("llama", {"sliding_window": 16}),  # Mistral's form: a window given is a window used
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}),
        ("qwen3", {"use_sliding_window": True}),  # no window: the upstream default (4096)
        ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}),
    ],
    ids=["llama-window", "qwen2-window", "qwen3-no-window", "layer-types"],
)
def test_sliding_window_is_refused_by_name(tmp_path, capsys, variant, changes):
    """These used to be ignored: the model attended to the whole context."""
    key = "layer_types" if "layer_types" in changes else "sliding"
    refused(capsys, copy(tmp_path, variant, setting(**changes)), key, "not supported")


def test_sliding_window_covering_the_context_changes_nothing(tmp_path):
    original = load_config(FIXTURES / "qwen2")
    d = copy(tmp_path, "qwen2", setting(use_sliding_window=True, sliding_window=256))
    assert load_config(d) == original
    d = copy(tmp_path / "b", "qwen2", setting(use_sliding_window=False, sliding_window=1))
    assert load_config(d) == original


def test_rope_keys_the_rope_type_does_not_read_are_refused(tmp_path, capsys):
    d = copy(tmp_path, "llama31", lambda c: {**c, "rope_scaling": {**c["rope_scaling"], "x": 1}})
    refused(capsys, d, "rope_scaling", "'x'")
    d = copy(tmp_path / "b", "llama", setting(rope_scaling={"factor": 4.0}))
    refused(capsys, d, "rope_scaling", "'factor'")


@pytest.mark.parametrize(
    "variant, changes, words",
    [
        ("llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings='false'"),  # was True
        ("llama", {"num_hidden_layers": 10**9}, "num_hidden_layers="),  # the load hung
        ("llama", {"num_key_value_heads": 8}, "num_key_value_heads=8"),
        ("llama", {"hidden_size": 66}, "not a multiple of num_attention_heads"),
        ("llama", {"rope_theta": 0.5}, "rope_theta=0.5"),
        ("llama", {"pretraining_tp": True}, "pretraining_tp=True"),
        ("chatglm3", {"multi_query_group_num": None}, "lacks multi_query_group_num"),
        ("chatglm6b", {"bos_token_id": 300}, "bos_token_id=300"),
        ("chatglm6b", {"pre_seq_len": 128}, "pre_seq_len=128"),
        ("chatglm3", {"quantization_bit": 4}, "quantization_bit=4"),
        ("qwen1", {"rotary_pct": 0.01}, "rotary dim 0"),
        ("qwen1", {"use_logn_attn": 1}, "use_logn_attn=1"),
        ("qwen1", {"scale_attn_weights": False}, "scale_attn_weights=False"),
        ("glm", {"partial_rotary_factor": -0.5}, "partial_rotary_factor=-0.5"),
        ("opt", {"word_embed_proj_dim": 0}, "word_embed_proj_dim=0"),
        ("baichuan7b", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_more_values_out_of_type_or_range(tmp_path, capsys, variant, changes, words):
    refused(capsys, copy(tmp_path, variant, setting(**changes)), words)


def test_architectures_of_the_wrong_type_do_not_crash_detection(tmp_path):
    """Qwen's detector read `"QWenLMHeadModel" in architectures`: a number was a TypeError."""
    d = copy(tmp_path, "baichuan7b", setting(architectures=5))
    assert load_config(d) == load_config(FIXTURES / "baichuan7b")


def test_values_real_checkpoints_use_still_load(tmp_path):
    """The checks refuse nothing real: forms and values from published configs."""
    qwen25 = {"sliding_window": 131072, "max_window_layers": 28, "use_sliding_window": False}
    assert load_config(copy(tmp_path, "qwen2", setting(**qwen25))) == load_config(
        FIXTURES / "qwen2"
    )
    v5 = {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert load_config(copy(tmp_path, "llama", setting(**v5))).rope_theta == 5e5
    assert load_config(copy(tmp_path, "chatglm3", setting(rope_ratio=50))).rope_theta == 5e5
    mistral = {"sliding_window": None}  # Mistral-7B-v0.2 and later: no window
    assert load_config(copy(tmp_path / "b", "llama", setting(**mistral))) == load_config(
        FIXTURES / "llama"
    )
    for config in (SHARED / "configs").glob("*/config.json"):  # beside the checkout, if there
        assert load_config(config).n_layers >= 24


def test_a_billion_layers_end_at_once_in_bounded_memory(tmp_path):
    """The loader names every layer's tensors: 10^9 layers ran for minutes before the check."""
    d = copy(tmp_path, "llama", setting(num_hidden_layers=10**9))
    code = (
        f"from slimllm.weights import load_checkpoint\nload_checkpoint({str(d)!r}, tokenizer=False)"
    )
    run = bounded(code, seconds=2.0, address_gb=4.0)
    assert run.returncode == 1 and "ConfigError" in run.stderr, run.stderr[-300:]
    assert "num_hidden_layers=1000000000" in run.stderr
    assert run.seconds < 2.0 and run.peak_mb < 200, (run.seconds, run.peak_mb)
