"""`slimllm bench` smoke test on a tiny model: the JSON report's schema and sane values.

Speed is never asserted (it depends on the machine and its load); the numbers themselves are
produced by `slimllm bench targets` and read by people.
"""

import json

from slimllm.cli import main

TINY = "--preset tiny --prompt-len 8 --new-tokens 4 --iterations 2 --runs 2 --json".split()


def bench(capsys, *argv):
    code = main(["bench", *argv, *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == "slimllm.bench/1" and report["peak_rss_bytes"] > 0
    return report


def positive(d, *keys):
    return all(isinstance(d[k], (int, float)) and d[k] > 0 for k in keys)


def test_decode_report_follows_xft_fields(capsys):
    r = bench(capsys, "decode", "--compare", "--layers", "1", "--bandwidth-mib", "8")
    assert r["kind"] == "decode"
    assert r["model"]["layers"] == 1 and r["model"]["layers_overridden_from"] == 2
    assert r["settings"]["batch"] == 1 and r["settings"]["prompt_len"] == 8
    bw = r["bandwidth"]
    assert positive(bw, "read_gbs", "numpy_copy_gbs", "xla_reduce_read_gbs")
    assert [s["when"] for s in bw["samples"]] == ["before", "after"]
    assert positive(r["floor"], "weight_bytes_per_token", "ms", "ms_with_kv")
    for name in ("jax", "numpy"):
        b = r["backends"][name]
        assert b["next_token_ms"]["n"] == 2 * 3  # iterations x (new tokens - 1)
        assert b["next_token_ms"]["min"] <= b["next_token_ms"]["p90"] <= b["next_token_ms"]["max"]
        assert positive(b["first_token_ms"], "mean", "p90")
        assert abs(b["throughput_tokens_per_s"] - 1000 / b["next_token_ms"]["mean"]) < 0.1
        assert b["compile_seconds_while_timed"] == 0 and b["peak_rss_bytes"] > 0
    assert r["backends"]["jax"]["compile_seconds"] > 0 and r["backends"]["jax"]["device_bytes"] > 0
    assert positive(r["compare"], "numpy_over_jax_next_token", "numpy_over_jax_first_token")


def test_micro_benchmarks_report_each_kind_and_dtype(capsys):
    shape = ["--tokens", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
    a = bench(capsys, "attention", *shape, "--kinds", "naive", "slim")
    assert set(a["kinds"]) == {"naive", "slim"} and a["shape"]["tokens"] == 64
    assert all(
        k["median_ms"] > 0 and k["max_abs_diff_vs_naive"] < 1e-4 for k in a["kinds"].values()
    )
    assert a["slim_over_naive"] > 0
    small = "--context 128 --kv-batch 2 --layers 1 --bandwidth-mib 0".split()
    k = bench(capsys, "kv-decode", *small)
    assert set(k["dtypes"]) == {"float32", "int8"} and k["context"] == 128
    assert k["dtypes"]["int8"]["kv_bytes_per_step"] < k["dtypes"]["float32"]["kv_bytes_per_step"]
    assert k["int8_over_float32_model_step"] > 0 and k["int8_over_float32_attention_layer"] > 0


def test_bad_options_are_one_line_errors(capsys):
    assert main(["bench", "--preset", "tiny", "--prompt-len", "600"]) == 2
    assert "context" in capsys.readouterr().err
