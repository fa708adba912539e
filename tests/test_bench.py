"""`slimllm bench` smoke test on a tiny model: the JSON report's schema and sane values.

Speed is never asserted (it depends on the machine and its load); the numbers themselves are
produced by `slimllm bench targets` and read by people.
"""

import json
from pathlib import Path

from slimllm import kernels
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
    r = bench(
        capsys, "decode", "--compare", "--layers", "1", "--bandwidth-mib", "8", "--kernels", "xla"
    )
    assert r["kind"] == "decode" and r["settings"]["kernels"] == "xla"
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
    prefill = k["dtypes"]["int8"]["prefill"]  # measured in a child process
    assert prefill["tokens"] == 127 and prefill["peak_rss_bytes"] > 0 and prefill["prefill_ms"] > 0
    assert k["int8_over_float32_peak_rss_bytes"] > 0


def test_bad_options_are_one_line_errors(capsys):
    assert main(["bench", "--preset", "tiny", "--prompt-len", "600"]) == 2
    assert "context" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--batch", "1,4"]) == 2  # a list: products only
    assert "one value" in capsys.readouterr().err


def test_products_times_every_weight_format_at_each_batch(capsys):
    from slimllm.jaxbackend import weight_format

    r = bench(capsys, "products", "--shapes", "tiny", "--batch", "1,2")
    formats = ["float32", "bfloat16", "float16", "int8", "int4"]  # the default: every format
    assert r["kind"] == "products" and r["batch"] == [1, 2] and r["base"] == "float32"
    assert r["kernels"] == "auto" and r["kernels_isa"] == kernels.isa()
    sh = r["shapes"]
    assert sh["name"] == "tiny" and sum(m["count"] for m in sh["matrices"]) == 2 * 4 + 1
    assert sh["params"] == sum(m["out"] * m["in"] * m["count"] for m in sh["matrices"])
    constants = (weight_format.TILE_ROWS, weight_format.TRANSPOSED_TILE_COLS)
    tiling = {"tile_rows": constants[0], "transposed_tile_cols": constants[1]}
    assert r["tiling"] == tiling | {"overridden": False}
    f = r["formats"]
    assert list(f) == formats
    for name in formats:
        assert list(f[name]["batches"]) == ["1", "2"]
        for x in f[name]["batches"].values():
            assert positive(x, "compile_seconds", "median_ms", "min_ms", "stored_gbs", "over_base")
    assert all(x["over_base"] == 1.0 for x in f["float32"]["batches"].values())
    assert f["float32"]["stored_bytes"] == 4 * sh["params"]
    assert 0.25 < f["int8"]["stored_bytes"] / f["float32"]["stored_bytes"] < 0.3  # + row scales
    assert f["bfloat16"]["stored_bytes"] == f["float16"]["stored_bytes"] == 2 * sh["params"]
    groups = {name: f[name]["weight_group"] for name in formats}
    assert groups == dict.fromkeys(formats[:4]) | {"int4": 32}  # int8: one scale per row
    # the tiling overridden while tracing, then restored
    argv = ["--shapes", "tiny", "--weights", "float32,int4", "--batch", "3"]
    r = bench(capsys, "products", *argv, "--tile-rows", "16", "--transposed-cols", "0")
    assert r["tiling"] == {"tile_rows": 16, "transposed_tile_cols": 0, "overridden": True}
    assert list(r["formats"]) == ["float32", "int4"] and list(r["formats"]["int4"]["batches"]) == [
        "3"
    ]
    assert (weight_format.TILE_ROWS, weight_format.TRANSPOSED_TILE_COLS) == constants


def test_decode_times_each_weight_format_against_the_first(capsys):
    formats = "float32,bfloat16,int8,int4"
    r = bench(capsys, "decode", "--backend", "numpy", "--weights", formats, "--weight-group", "16")
    assert r["settings"]["weights"] == formats.split(",") and r["settings"]["weight_group"] == 16
    f = r["formats"]
    assert list(f) == formats.split(",") and r["floor"] == f["float32"]["floor"]
    assert r["backends"] == f["float32"]["backends"]
    step = [f[name]["floor"]["weight_bytes_per_token"] for name in f]
    assert step == sorted(step, reverse=True) and step[0] > 1.9 * step[1]  # norms stay float32
    assert f["int8"]["weight_group"] == 16 and f["bfloat16"]["weight_group"] is None
    for name in f:
        b = f[name]["backends"]["numpy"]
        assert f[name]["floor"]["weights"] == name and b["next_token_ms"]["n"] == 2 * 3
    ratios = r["compare_weights"]
    assert ratios["base"] == "float32" and set(ratios["numpy"]) == {"bfloat16", "int8", "int4"}
    assert all(positive(v, "next_token", "first_token") for v in ratios["numpy"].values())


def test_realsize_writes_a_sharded_bf16_checkpoint_and_runs_it(capsys, tmp_path):
    import numpy as np
    from safetensors import safe_open

    argv = ["--backend", "numpy", "--weights", "bfloat16,int8", "--dir", str(tmp_path)]
    r = bench(capsys, "realsize", *argv, "--keep", "--shard-mb", "0.1")
    c, path = r["checkpoint"], tmp_path / Path(r["checkpoint"]["path"]).name
    assert c["kept"] and c["written"] and len(c["files"]) > 1 and path.is_dir()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["torch_dtype"] == "bfloat16"
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {f["name"] for f in c["files"]}
    with safe_open(path / index["model.layers.0.mlp.down_proj.weight"], "np") as f:
        w = f.get_slice("model.layers.0.mlp.down_proj.weight")
        assert w.get_dtype() == "BF16" and w.get_shape() == [64, 128]  # [out, in]
        std = f.get_tensor("model.layers.0.mlp.down_proj.weight").astype(np.float32).std()
    assert abs(std * 128**0.5 - 1) < 0.05  # N(0, 1/fan_in)
    runs = r["runs"]
    for name in ("bfloat16", "int8"):
        x = runs[name]["numpy"]
        assert "error" not in x, x.get("error")
        assert positive(x, "load_seconds", "weight_bytes", "peak_rss_bytes", "first_token_ms")
        assert x["next_token_ms"]["n"] == 3 and len(x["ids"]) == 4
    assert runs["int8"]["numpy"]["weight_bytes"] < runs["bfloat16"]["numpy"]["weight_bytes"]
    # jax in a second run (float32 until the JAX backend has the other formats); deleted after
    r = bench(
        capsys, "realsize", "--backend", "jax", "--weights", "float32", "--dir", str(tmp_path)
    )
    x = r["runs"]["float32"]["jax"]
    assert "error" not in x, x.get("error")
    assert positive(x, "cold_first_token_ms", "compile_seconds", "device_put_seconds")
    assert x["compile_seconds_while_timed"] == 0
    assert not r["checkpoint"]["kept"] and not Path(r["checkpoint"]["path"]).exists()


def test_compile_report_counts_what_the_warm_process_read(capsys):
    r = bench(capsys, "compile")
    cold, warm = r["cold"], r["warm"]
    assert r["kind"] == "compile" and r["settings"]["prompt_len"] == 8 and r["cache_entries"] > 0
    assert cold["compiled"] == cold["programs"] > 0 and cold["read_from_cache"] == 0
    assert warm["compiled"] == 0 and warm["read_from_cache"] == cold["programs"]
    assert warm["disk_cache"]["misses"] == 0
    assert positive(cold, "first_token_seconds", "again_first_token_seconds", "compile_seconds")


def test_serve_reports_each_concurrency_level(capsys):
    """`slimllm bench serve --quick`: a server started on the shipped model, 1, 4 and 16
    streaming clients, one short request each."""
    code = main(["bench", "serve", "--quick", "--batch", "1,4,16", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["schema"] == "slimllm.bench/1" and r["kind"] == "serve"
    assert list(r["levels"]) == ["1", "4", "16"] and r["throughput_16_over_1"] > 0
    for n, level in r["levels"].items():
        assert level["clients"] == level["requests"] == int(n)
        assert 0 < level["completion_tokens"] <= 8 * int(n)
        assert level["throughput_tokens_per_s"] > 0 and level["ttft_ms"]["p50"] > 0
        assert level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"]
        assert level["prefix_cache"]["lookups"] == int(n)  # every prompt looked up
        assert 0 <= level["prefix_cache"]["hit_rate"] <= 1
