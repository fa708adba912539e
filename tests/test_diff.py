"""slimllm diff: divergence reports between implementations, located at the right layer and
intermediate, against slimllm settings, a user's npz dump, and transformers when installed."""

import copy
import json

import numpy as np
import pytest

import slimllm
from conftest import FIXTURES, STORIES
from slimllm.cli import main
from slimllm.diff import SCHEMA, compare, diff, parse_side, reference_trace
from slimllm.reference.model import TRACE_KEYS
from slimllm.reference.runtime import Runtime


@pytest.fixture(scope="module")
def llama():
    model = slimllm.load(FIXTURES / "llama")
    tokens = np.load(FIXTURES / "llama" / "oracle.npz")["prompt_a"].tolist()
    return model, tokens


def dump(path, model, tokens, side="numpy"):
    """What a user does: save their implementation's intermediates under our names."""
    trace = reference_trace(model, tokens, len(tokens), parse_side(side))
    np.savez(path, tokens=np.asarray(tokens), **trace)
    return trace


def test_identical_settings_report_zero(llama):
    model, tokens = llama
    report = diff(model, tokens, len(tokens), parse_side("numpy"), parse_side("numpy"))
    assert report["max_rel"] == 0 and report["first"] is None and not report["missing"]
    names = {r["name"] for r in report["rows"]}
    assert {"attn_in", "q", "k", "v", "attn_out", "mlp_in", "mlp_out", "out"} <= names
    assert {"embed", "final_norm", "logits"} <= {r["key"] for r in report["rows"]}


def test_perturbed_weight_is_found_at_its_layer_and_intermediate(llama, tmp_path):
    model, tokens = llama
    broken = copy.deepcopy(model)
    broken.params.layers[1].w_up = broken.params.layers[1].w_up * 1.01
    dump(tmp_path / "broken.npz", broken, tokens)
    report = diff(
        model,
        tokens,
        len(tokens),
        parse_side("numpy"),
        parse_side(f"dump:{tmp_path / 'broken.npz'}"),
    )
    assert report["first"]["key"] == "layers.1.mlp_out"
    exceeding = [r["key"] for r in report["rows"] if r["exceeds"]]
    assert "layers.1.mlp_in" not in exceeding and "layers.0.out" not in exceeding


def test_swapped_rope_style_is_found_at_the_first_queries(llama, tmp_path):
    model, tokens = llama
    swapped = copy.deepcopy(model)
    swapped.cfg = model.cfg.replace(rope_style="interleaved")
    dump(tmp_path / "swapped.npz", swapped, tokens)
    report = diff(
        model,
        tokens,
        len(tokens),
        parse_side("numpy"),
        parse_side(f"dump:{tmp_path / 'swapped.npz'}"),
    )
    assert report["first"]["key"] == "layers.0.q"
    assert report["first"]["first_position"] == 1  # position 0 is not rotated by either style


def test_user_dump_passes_and_an_injected_error_points_at_its_key(llama, tmp_path):
    model, tokens = llama
    trace = dump(tmp_path / "mine.npz", model, tokens)
    ok = diff(
        model, None, len(tokens), parse_side("numpy"), parse_side(f"dump:{tmp_path}/mine.npz")
    )
    assert ok["first"] is None and ok["max_rel"] == 0
    trace["layers.1.attn_out"][5] += 0.05  # a bug at token 5 of layer 1's attention
    np.savez(tmp_path / "bug.npz", tokens=np.asarray(tokens), **trace)
    bad = diff(
        model, None, len(tokens), parse_side("numpy"), parse_side(f"dump:{tmp_path}/bug.npz")
    )
    assert bad["first"]["key"] == "layers.1.attn_out" and bad["first"]["first_position"] == 5


def test_partial_dumps_and_bad_dumps(llama, tmp_path):
    model, tokens = llama
    np.savez(
        tmp_path / "few.npz",
        tokens=np.asarray(tokens),
        logits=reference_trace(model, tokens, len(tokens), parse_side("numpy"))["logits"],
    )
    report = diff(
        model, None, len(tokens), parse_side("numpy"), parse_side(f"dump:{tmp_path}/few.npz")
    )
    assert [r["key"] for r in report["rows"]] == ["logits"] and "embed" in report["missing"]
    np.savez(tmp_path / "odd.npz", tokens=np.asarray(tokens), **{"layers.0.attention": np.zeros(3)})
    with pytest.raises(ValueError, match="unknown key"):
        diff(model, None, 12, parse_side("numpy"), parse_side(f"dump:{tmp_path}/odd.npz"))
    np.savez(tmp_path / "notokens.npz", logits=np.zeros(3))
    with pytest.raises(ValueError, match="needs a 'tokens' array"):
        diff(model, None, 12, parse_side("numpy"), parse_side(f"dump:{tmp_path}/notokens.npz"))


def test_jax_and_tensor_parallel_sides_agree_and_int8_drift_starts_in_attention(llama):
    model, tokens = llama
    for side in ("jax", "jax:slim:tp2"):
        report = diff(model, tokens, len(tokens), parse_side("numpy"), parse_side(side))
        assert report["first"] is None, (side, report["first"])
        assert report["max_rel"] < 1e-5
    report = diff(model, tokens, len(tokens), parse_side("numpy"), parse_side("jax:int8"))
    assert report["first"]["key"] == "layers.0.attn_out"  # K/V are exact until the cache


@pytest.mark.parametrize(
    "rt",
    [
        Runtime("numpy"),
        Runtime("numpy", "flash", kv_dtype="bfloat16", weights="bfloat16"),
        Runtime("numpy", weights="int8", weight_group=16),
        Runtime("jax", "slim", kv_dtype="int8", tp=2, weights="int4", weight_group=32),
        Runtime("jax", kv_dtype="float16", weights="float16"),
    ],
)
def test_a_side_reads_back_the_description_it_prints(rt):
    assert parse_side(rt.describe()).rt == rt
    parts = rt.describe().split(":")
    assert parse_side(":".join(reversed(parts))).rt == rt  # parts in any order


@pytest.mark.parametrize(
    "side, message",
    [
        ("numpy:wint3", "unknown weight format 'int3'"),
        ("numpy:g32", "a weight group needs a quantised weight format"),
        ("numpy:wfloat16:g32", "a weight group needs a quantised weight format"),
        ("numpy:wint8:g0", "weight_group must be a positive integer"),
    ],
)
def test_bad_weight_parts_of_a_side(side, message):
    with pytest.raises(ValueError, match=message):
        parse_side(side)


def test_a_weight_format_side_drifts_from_the_tables_on(llama):
    """Weight formats re-encode the float32 model once: float32 is the same run, and every other
    format stores the embedding table too, so the drift starts at the first intermediate."""
    model, tokens = llama
    same = diff(model, tokens, len(tokens), parse_side("numpy"), parse_side("numpy:wfloat32"))
    assert same["max_rel"] == 0
    for fmt in ("wbfloat16", "wfloat16", "wint8", "wint4:g32"):
        report = diff(model, tokens, len(tokens), parse_side("numpy"), parse_side(f"numpy:{fmt}"))
        assert report["first"]["key"] == "embed", fmt
        assert report["b"]["weights"] == fmt[1:].split(":")[0]
    int8 = diff(model, tokens, len(tokens), parse_side("numpy:wint8"), parse_side("numpy:wint8"))
    assert int8["max_rel"] == 0  # quantisation is deterministic: the same setting, the same run


def test_jax_sides_in_a_weight_format_match_numpy_in_that_format(llama):
    model, tokens = llama
    for fmt in ("wint8", "wint4:g32"):
        a, b = parse_side(f"numpy:{fmt}"), parse_side(f"jax:slim:{fmt}:tp2")
        report = diff(model, tokens, len(tokens), a, b)
        assert report["first"] is None and report["max_rel"] < 1e-5, (fmt, report["first"])


def test_compare_orders_rows_and_rejects_shape_mismatch():
    a = {"embed": np.ones((2, 3)), "layers.0.q": np.ones((2, 1, 4)), "logits": np.ones((2, 5))}
    b = {"embed": np.ones((2, 3)), "layers.0.q": np.ones((2, 1, 4)) * 1.1}
    report = compare(a, b, tol=0.05)
    assert [r["key"] for r in report["rows"]] == ["embed", "layers.0.q"]
    assert report["first"]["layer"] == 0 and report["first"]["name"] == "q"
    assert report["missing"] == ["logits"]
    with pytest.raises(ValueError, match="shapes differ"):
        compare(a, {"embed": np.ones((3, 3))})


def test_cli_json_schema(capsys, tmp_path):
    model = str(STORIES / "stories260K.bin")
    assert main(["diff", "--model", model, "--length", "40", "--b", "jax:int8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == SCHEMA
    assert set(report) >= {
        "schema",
        "model",
        "a",
        "b",
        "tokens",
        "tolerance",
        "rows",
        "first",
        "missing",
        "max_rel",
    }
    row = report["rows"][0]
    assert set(row) == {
        "key",
        "layer",
        "name",
        "shape",
        "max_abs",
        "rel",
        "exceeds",
        "first_position",
    }
    assert report["tokens"] == 40 and report["first"]["key"] == "layers.0.attn_out"
    assert report["a"]["desc"] == "numpy:naive:float32" and report["b"]["kv_dtype"] == "int8"
    keys = {r["key"] for r in report["rows"]}
    assert keys == {k.format(i=i) for k in TRACE_KEYS for i in range(5)}


def test_cli_table_and_mistakes(capsys, tmp_path):
    model = str(STORIES / "stories260K.bin")
    assert main(["diff", "--model", model, "--ids", "1,5,9,13", "--b", "jax:flash"]) == 0
    out = capsys.readouterr().out
    assert "no intermediate exceeds the tolerance" in out and "layers.4.out" in out
    assert main(["diff", "--model", model, "--ids", "1,2", "--b", "jax:int4"]) == 2
    assert "unknown kv cache dtype 'int4'" in capsys.readouterr().err
    assert main(["diff", "--model", model, "--dump", str(tmp_path / "none.npz")]) == 2
    assert "no such dump file" in capsys.readouterr().err
    assert main(["diff", "--model", model, "--ids", "1,2", "--b", "numpy:wint4"]) == 2
    assert "weight group 32 does not divide rows of 172" in capsys.readouterr().err


def test_cli_weight_format_side(capsys):
    model = str(STORIES / "stories260K.bin")
    argv = ["diff", "--model", model, "--ids", "1,5,9,13", "--b", "numpy:wint4:g4", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["b"]["weights"] == "int4" and report["b"]["weight_group"] == 4
    assert report["b"]["desc"] == "numpy:naive:float32:wint4:g4"
    assert report["first"]["key"] == "embed"


def test_progress_stays_out_of_json(capsys, monkeypatch):
    monkeypatch.setenv("SLIMLLM_PROGRESS", "1")
    model = str(STORIES / "stories260K.bin")
    assert (
        main(
            [
                "eval",
                "--model",
                model,
                "--length",
                "30",
                "--greedy-tokens",
                "5",
                "--backend",
                "numpy",
                "--json",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out)["positions"] == 30  # stdout is exactly one JSON object
    assert "eval" in err  # the bar went to stderr


def test_against_hf(llama):
    pytest.importorskip(
        "transformers",
        reason="--against hf needs the oracle extra "
        "(torch + transformers), which CI does not install",
    )
    model, tokens = llama
    report = diff(model, tokens, len(tokens), parse_side("numpy"), parse_side("hf"))
    assert report["first"] is None, report["first"]
    compared = {r["key"] for r in report["rows"]}
    assert {
        "embed",
        "layers.0.attn_in",
        "layers.1.attn_out",
        "layers.1.mlp_out",
        "final_norm",
        "logits",
    } <= compared
    assert "layers.0.q" in report["missing"]  # inside the HF attention forward: not hooked
