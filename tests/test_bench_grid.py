"""`slimllm bench grid` on a tiny model, one round: the report's structure, and its ratios and
verdicts computed from the numbers it reports (speed itself is never asserted)."""

import dataclasses
import json

from slimllm.bench.common import macs_per_row
from slimllm.bench.grid import summary
from slimllm.cli import main
from slimllm.kernels.linear import batched_instruction
from slimllm.reference.config import ModelConfig
from slimllm.reference.params import init_params

TINY = "--preset tiny --layers 1 --prompt-len 8 --new-tokens 4 --iterations 1".split()
TINY += ["--bandwidth-mib", "8"]


def grid(capsys, *argv):
    code = main(["bench", "grid", *TINY, *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_grid_reports_every_variant_and_judges_its_own_numbers(capsys):
    argv = "--weights int8 --batch 1,2 --prefill-lens 16 --kernels auto,xla".split()
    r = grid(capsys, *argv)
    s = r["settings"]
    assert r["kind"] == "grid" and s["batch"] == [1, 2] and s["prefill_lens"] == [16]
    assert s["kernels"] == ["auto", "xla"] and s["weights"] == ["int8"]
    gbs = r["bandwidth"]["read_gbs"]
    assert [x["when"] for x in r["bandwidth"]["samples"]] == ["before", "after"]
    assert list(r["results"]) == ["auto", "xla"]
    for k, formats in r["results"].items():
        assert list(formats) == ["int8"]
        for name, f in formats.items():
            fl = f["floor"]
            assert fl["weights"] == name
            assert abs(fl["ms"] - fl["weight_bytes_per_token"] / gbs / 1e6) < 1e-3
            assert list(f["decode"]) == ["1", "2"] and list(f["prefill"]) == ["16"]
            for b, d in f["decode"].items():
                nt = d["next_token_ms"]
                assert nt["n"] == 3 and nt["min"] <= nt["p50"] <= nt["p90"] <= nt["max"]
                assert d["first_token_ms"]["n"] == 1 and d["compile_seconds_while_timed"] == 0
                assert abs(d["tokens_per_s"] - 1000 / nt["p50"] * int(b)) < 0.01
            p = f["prefill"]["16"]
            assert p["ms"]["n"] == 1 and abs(p["tokens_per_s"] - 16e3 / p["ms"]["p50"]) < 0.01
            one, two = (f["decode"][b]["next_token_ms"]["p50"] for b in ("1", "2"))
            assert f["b1_over_floor"] == round(one / fl["ms"], 3)
            cf = f["compute_floor"]
            assert cf["macs_per_row"] == macs(r["model"]["config"])
            assert cf["instruction"] == batched_instruction("int8", None, k)
            peak = cf["peak_macs_per_s"]
            expected = {
                b: None if peak is None else round(cf["macs_per_row"] * int(b) / peak * 1e3, 3)
                for b in ("1", "2")
            }
            assert cf["ms"] == expected
            least = None if peak is None else round(max(fl["ms"], cf["ms"]["2"]) / one, 3)
            assert f["step_ratio"] == {
                "batch": 2,
                "value": round(two / one, 3),
                "least_possible": least,
            }
    assert len(r["targets"]) == 2 * 2  # kernels x (floor, step ratio)
    for t in r["targets"]:
        f = r["results"][t["kernels"]][t["weights"]]
        value, threshold = (f["b1_over_floor"], 1.2) if "floor" in t["name"] else (None, 1.5)
        value = f["step_ratio"]["value"] if value is None else value
        assert (t["value"], t["threshold"], t["op"]) == (value, threshold, "<=")
        assert t["met"] == (value <= threshold)
        if "floor" not in t["name"]:
            assert t["least_possible"] == f["step_ratio"]["least_possible"]
    c = r["kernels_compare"]
    assert (c["base"], c["other"]) == ("auto", "xla") and list(c["formats"]) == ["int8"]
    auto, xla = r["results"]["auto"]["int8"], r["results"]["xla"]["int8"]
    step = [x["decode"]["2"]["next_token_ms"]["p50"] for x in (auto, xla)]
    assert c["formats"]["int8"]["next_token"]["2"] == round(step[1] / step[0], 3)
    prefill = [x["prefill"]["16"]["ms"]["p50"] for x in (auto, xla)]
    assert c["formats"]["int8"]["prefill"]["16"] == round(prefill[1] / prefill[0], 3)
    table = summary(r)  # what `slimllm bench grid` prints without --json
    assert "int8 step b2 within 1.5x of b1" in table and "xla over auto" in table


def macs(config: dict) -> int:
    """Multiply-adds of one token through a llama-style model's products, counted by hand."""
    e, h, k, d = config["width"], config["n_heads"], config["n_kv_heads"], config["head_dim"]
    f, v, layers = config["ffn_width"], config["vocab"], config["n_layers"]
    ffn = 3 if config["mlp"] == "swiglu" else 2
    return layers * (e * h * d + 2 * e * k * d + h * d * e + ffn * e * f) + e * v


def test_macs_per_row_counts_the_products_not_the_tables():
    """Norms, biases and looked-up tables multiply nothing; a tied head is the table, once."""
    cfg = ModelConfig(
        96, 32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_width=48, max_len=16
    )
    config = dataclasses.asdict(cfg)
    assert macs_per_row(init_params(cfg), cfg) == macs(config)
    tied = dataclasses.replace(cfg, tied_head=True, qkv_bias=True)
    assert macs_per_row(init_params(tied), tied) == macs(config)


def test_grid_and_kernels_options_are_checked(capsys):
    for argv, said in [
        (["bench", "grid", *TINY, "--backend", "numpy"], "jax backend only"),
        (["bench", "grid", *TINY, "--prefill-lens", "600"], "context"),
        (["bench", "decode", *TINY, "--kernels", "auto,xla"], "one value"),
    ]:
        assert main(argv) == 2
        assert said in capsys.readouterr().err
