"""Loading one tensor at a time, in the checkpoint's own dtype or a requested weight format.

Every format a checkpoint loads in must equal what the float32 load gives re-encoded
(`encode_params`), bit for bit; bfloat16 and float16 checkpoints load in their own dtype by
default; every strictness check runs before tensor data is read; bad safetensors files fail
with a `CheckpointError` naming the file; and a NaN/Inf weight (or one the format would store
as Inf) is refused while it is read, naming the tensor and counting the bad values. The memory
a load takes is measured (not timed) in `test_loading_memory_is_the_result_plus_a_fixed_amount`.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import slimllm
from conftest import FIXTURES, ROOT, STORIES
from slimllm.reference.params import init_params
from slimllm.reference.weight_format import (
    Compact,
    encode_params,
    iter_weights,
    weight_format,
    widen,
)
from slimllm.weights import load_checkpoint, stream
from slimllm.weights.convert import convert
from slimllm.weights.families import detect
from slimllm.weights.io import CheckpointError, Lazy
from slimllm.weights.torch_bin_write import write_torch_bin


def same_weights(a, b):
    """Two Params hold the same stored weights: same kinds, dtypes, shapes and bytes."""
    for x, y in zip(iter_weights(a), iter_weights(b), strict=True):
        assert type(x) is type(y)
        if isinstance(x, Compact):
            assert (x.encoding, x.transposed) == (y.encoding, y.transposed)
            assert x.values.dtype == y.values.dtype and x.values.shape == y.values.shape
            assert x.values.tobytes() == y.values.tobytes()
            assert (x.scale is None) == (y.scale is None)
            if x.scale is not None:
                assert x.scale.tobytes() == y.scale.tobytes()
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and x.flags.c_contiguous
            assert x.tobytes() == np.ascontiguousarray(y).tobytes()


def half_checkpoint(tmp_path, dtype=ml_dtypes.bfloat16, named=None, fixture="llama"):
    """A copy of a fixture with its tensors cast to `dtype`; `named`: the config's dtype keys."""
    src = FIXTURES / fixture
    d = tmp_path / f"{fixture}-{np.dtype(dtype).name}"
    d.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config.pop("torch_dtype", None)
    (d / "config.json").write_text(json.dumps(config | (named or {})))
    tensors = {n: w.astype(dtype) for n, w in load_file(src / "model.safetensors").items()}
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("named", [{"torch_dtype": "bfloat16"}, {"dtype": "bfloat16"}, None])
def test_bf16_checkpoint_loads_as_bfloat16_exactly(tmp_path, named):
    """Named by config.json or found in the file, bf16 stays bf16 and widens to the f32 load."""
    d = half_checkpoint(tmp_path, named=named)
    native = load_checkpoint(d, tokenizer=False)
    assert native.weights == "bfloat16"
    assert all(
        w.encoding == "bfloat16" for w in iter_weights(native.params) if isinstance(w, Compact)
    )
    wide = load_checkpoint(d, tokenizer=False, weights="float32").params
    for a, b in zip(iter_weights(native.params), iter_weights(wide), strict=True):
        assert widen(a).tobytes() == np.ascontiguousarray(b).tobytes()
    same_weights(native.params, encode_params(wide, weight_format("bfloat16")))


def test_other_checkpoints_load_in_their_own_dtype(tmp_path):
    """float16 stays float16; float64 and llama2.c files load as float32; config.json wins."""
    assert load_checkpoint(half_checkpoint(tmp_path, np.float16), tokenizer=False).weights == (
        "float16"
    )
    assert load_checkpoint(half_checkpoint(tmp_path, np.float64), tokenizer=False).weights == (
        "float32"
    )
    assert load_checkpoint(FIXTURES / "llama", tokenizer=False).weights == "float32"
    assert slimllm.load(STORIES / "stories260K.bin").weights == "float32"
    d = half_checkpoint(tmp_path / "named", named={"torch_dtype": "float32"})
    assert load_checkpoint(d, tokenizer=False).weights == "float32"


@pytest.mark.parametrize("fmt", ["int8", "int4", "float16", "bfloat16"])
@pytest.mark.parametrize("fixture", ["llama", "qwen1", "chatglm6b", "baichuan2_7b"])
def test_every_format_equals_the_float32_load_reencoded(fixture, fmt):
    """Fused splitters (qwen1, chatglm6b) and NormHead (baichuan2) included."""
    wide = load_checkpoint(FIXTURES / fixture, tokenizer=False, weights="float32").params
    loaded = load_checkpoint(FIXTURES / fixture, tokenizer=False, weights=fmt)
    assert loaded.weights == fmt
    same_weights(loaded.params, encode_params(wide, weight_format(fmt)))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bf16_checkpoint_quantised_equals_the_float32_load_quantised(tmp_path, fmt):
    d = half_checkpoint(tmp_path)
    wide = load_checkpoint(d, tokenizer=False, weights="float32").params
    same_weights(
        load_checkpoint(d, tokenizer=False, weights=fmt).params,
        encode_params(wide, weight_format(fmt)),
    )


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
def test_encoding_in_many_row_blocks_equals_encoding_at_once(monkeypatch, fmt):
    """The fixtures are small enough for one block: make blocks of a row or two."""
    wide = load_checkpoint(FIXTURES / "llama", tokenizer=False, weights="float32").params
    monkeypatch.setattr(stream, "BLOCK", 300)
    loaded = load_checkpoint(FIXTURES / "llama", tokenizer=False, weights=fmt).params
    same_weights(loaded, wide if fmt == "float32" else encode_params(wide, weight_format(fmt)))


def test_llama2c_formats_equal_the_float32_load_reencoded(monkeypatch):
    wide = load_checkpoint(STORIES / "stories260K.bin", weights="float32").params
    monkeypatch.setattr(stream, "BLOCK", 1000)
    for fmt in ("float32", "bfloat16", "int8"):
        loaded = load_checkpoint(STORIES / "stories260K.bin", weights=fmt).params
        same_weights(loaded, wide if fmt == "float32" else encode_params(wide, weight_format(fmt)))


def test_bf16_pytorch_bin_loads_like_bf16_safetensors(tmp_path):
    d = half_checkpoint(tmp_path)
    b = tmp_path / "bin"
    b.mkdir()
    shutil.copy(d / "config.json", b / "config.json")
    f32 = {n: w.astype(np.float32) for n, w in load_file(d / "model.safetensors").items()}
    write_torch_bin(b / "pytorch_model.bin", f32, bf16_from_float32=True)  # exact: already bf16
    from_bin = load_checkpoint(b, tokenizer=False)
    assert from_bin.weights == "bfloat16"
    same_weights(from_bin.params, load_checkpoint(d, tokenizer=False).params)


def poisoned(tmp_path, fixture: str, name: str, where, value: float, dtype=np.float32):
    """A copy of a fixture (tensors cast to `dtype`) with `value` at `where` of tensor `name`."""
    shutil.copy(FIXTURES / fixture / "config.json", tmp_path / "config.json")
    tensors = {
        n: w.astype(dtype) for n, w in load_file(FIXTURES / fixture / "model.safetensors").items()
    }
    tensors[name][where] = value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize(
    ("case", "fixture", "name", "where", "fmt", "dtype", "message"),
    [
        (  # a matrix read in blocks of rows: every block counted
            "nan_in_matrix_blocks",
            "llama",
            "model.layers.1.self_attn.q_proj.weight",
            (slice(0, 64, 3), 5),
            "float32",
            np.float32,
            r"tensor model\.layers\.1\.self_attn\.q_proj\.weight: 22 of 4096 values are NaN",
        ),
        (
            "inf_in_vector",
            "llama",
            "model.norm.weight",
            (slice(0, 2),),
            "int8",
            np.float32,
            r"tensor model\.norm\.weight: 2 of 64 values are NaN or Inf",
        ),
        (
            "bf16_nan_quantised",
            "llama",
            "lm_head.weight",
            (7, 7),
            "int4",
            ml_dtypes.bfloat16,
            r"tensor lm_head\.weight: 1 of 16384 values",
        ),
        (  # a fused tensor: named with the weight of it that holds the NaN
            "nan_in_fused",
            "chatglm6b",
            "transformer.layers.1.attention.query_key_value.weight",
            (40, 3),
            "float32",
            np.float32,
            r"tensor transformer\.layers\.1\.attention\.query_key_value\.weight "
            r"\(layers\.1\.w[qkv]\): 1 of 4096 values",
        ),
        (  # a transformed weight (NormHead) checked after its maths
            "inf_in_normhead",
            "baichuan2_7b",
            "lm_head.weight",
            (3, 0),
            "float32",
            np.float32,
            r"tensor lm_head\.weight: 1 of 16384 values",
        ),
    ],
)
def test_non_finite_weights_are_refused_at_load(
    tmp_path, case, fixture, name, where, fmt, dtype, message
):
    """NaN/Inf weights loaded silently and generated token 0 forever (issue 14)."""
    value = np.nan if "nan" in case else np.inf
    d = poisoned(tmp_path, fixture, name, where, value, dtype)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: {message}"):
        load_checkpoint(d, tokenizer=False, weights=fmt)


def test_non_finite_weights_are_counted_over_every_block(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "BLOCK", 300)  # a block of one row of 64 float32
    name = "model.layers.0.mlp.up_proj.weight"
    d = poisoned(tmp_path, "llama", name, (slice(None), 0), -np.inf)
    with pytest.raises(CheckpointError, match=f"tensor {name}: 128 of 8192 values are NaN or"):
        load_checkpoint(d, tokenizer=False)


def test_weights_too_large_for_the_format_are_refused(tmp_path):
    """float32 1e5 is finite but Inf as float16."""
    name = "model.layers.0.mlp.down_proj.weight"
    d = poisoned(tmp_path, "llama", name, (1, slice(0, 3)), 1e5)
    with pytest.raises(CheckpointError, match=f"tensor {name}: 3 values are too large for weight"):
        load_checkpoint(d, tokenizer=False, weights="float16")
    assert load_checkpoint(d, tokenizer=False, weights="bfloat16").weights == "bfloat16"


def test_int4_refuses_weights_whose_scale_float16_cannot_hold(tmp_path):
    """int4's scales are float16: a group's amax / 7 must stay within 65504 (int8's float32
    scales take the same weight)."""
    name = "model.layers.0.mlp.down_proj.weight"
    d = poisoned(tmp_path, "llama", name, (1, 0), 5e5)  # 5e5 / 7 > 65504
    said = f"tensor {name}: 1 values are too large for weight format int4 \\(beyond 458528: "
    with pytest.raises(CheckpointError, match=said + "their float16 scale would be stored as Inf"):
        load_checkpoint(d, tokenizer=False, weights="int4")
    assert load_checkpoint(d, tokenizer=False, weights="int8").weights == "int8"


def test_non_finite_llama2c_weight_is_refused(tmp_path):
    """llama2.c files go through the same encoder: a NaN in layer 1's wq is named."""
    from slimllm.weights.llama2c import HEADER, layout, llama2c_config

    raw = bytearray((STORIES / "stories260K.bin").read_bytes())
    cfg = llama2c_config(STORIES / "stories260K.bin")
    offset = HEADER
    for name, shape in layout(cfg):
        if name == "wq":
            offset += 4 * int(np.prod(shape[1:]))  # layer 1
            break
        offset += 4 * int(np.prod(shape))
    raw[offset + 8 : offset + 12] = np.float32(np.nan).tobytes()
    (tmp_path / "nan.bin").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"nan\.bin: tensor wq\[1\]: 1 of \d+ values are NaN"):
        load_checkpoint(tmp_path / "nan.bin")


def unreadable(tensors: dict) -> dict[str, Lazy]:
    """Lazy handles with the tensors' names, dtypes and shapes whose data cannot be read."""

    def fail(*_):
        raise AssertionError("tensor data was read before the checks")

    return {n: Lazy(FIXTURES, n, w.dtype, w.shape, fail, by_rows=True) for n, w in tensors.items()}


@pytest.mark.parametrize("fixture", ["llama", "chatglm6b"])
def test_strictness_checks_run_before_any_data_is_read(fixture):
    hf = json.loads((FIXTURES / fixture / "config.json").read_text())
    family = detect(hf)
    cfg = family.config_from_hf(hf)
    tensors = load_file(FIXTURES / fixture / "model.safetensors")
    fmt = weight_format("int8")
    matrix = next(n for n in sorted(tensors) if tensors[n].ndim == 2 and "mlp" in n)
    without = {n: w for n, w in tensors.items() if n != matrix}
    with pytest.raises(CheckpointError, match=f"missing tensor {matrix}"):
        convert(family, cfg, unreadable(without), fmt)
    with pytest.raises(CheckpointError, match="unexpected tensor.*mystery"):
        convert(family, cfg, unreadable(tensors | {"mystery": np.zeros(3)}), fmt)
    wrong = tensors | {matrix: np.zeros((3, 5), np.float32)}
    with pytest.raises(CheckpointError, match=rf"tensor {matrix} has shape \(3, 5\), expected"):
        convert(family, cfg, unreadable(wrong), fmt)


def write_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_bad_safetensors_fail_naming_the_file(tmp_path):
    """Negative and overlapping offsets, a truncated file, a bad header and an unsupported dtype
    each give a CheckpointError that names the file and the tensor."""
    shutil.copy(FIXTURES / "llama" / "config.json", tmp_path / "config.json")
    path = tmp_path / "model.safetensors"
    x = np.arange(8, dtype=np.float32).tobytes()
    a = {"dtype": "F32", "shape": [4]}
    cases = {
        r"tensor a: data_offsets \[-16, 0\] do not hold F32 \[4\]": (
            {"a": a | {"data_offsets": [-16, 0]}},
            x[:16],
        ),
        r"tensor b at \[8, 24\) overlaps a": (
            {"a": a | {"data_offsets": [0, 16]}, "b": a | {"data_offsets": [8, 24]}},
            x[:24],
        ),
        r"describes 32 bytes of data, the file holds 20 \(truncated": (
            {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
            x[:20],
        ),
        r"tensor a: dtype 'C64' is not one of": (
            {"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}},
            x,
        ),
    }
    for message, (header, data) in cases.items():
        write_safetensors(path, header, data)
        with pytest.raises(CheckpointError, match=f"model.safetensors: .*{message}"):
            slimllm.load(tmp_path)
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(CheckpointError, match="model.safetensors.*JSON"):
        slimllm.load(tmp_path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        slimllm.load(tmp_path)


def test_a_tensor_in_two_shards_is_an_error(tmp_path):
    shutil.copy(FIXTURES / "llama" / "config.json", tmp_path / "config.json")
    tensors = load_file(FIXTURES / "llama" / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(tmp_path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[4:]}, str(tmp_path / "b.safetensors"))
    weight_map = dict.fromkeys(names[:5], "a.safetensors") | dict.fromkeys(
        names[5:], "b.safetensors"
    )
    index = {"weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"b.safetensors: tensor {names[4]} appears in"):
        slimllm.load(tmp_path)


class StubEngine:
    """Stands in for the JAX engine: it keeps the params it was given, and whether it was told
    it may consume them (empty the host copy as it places them)."""

    def __init__(self, params, cfg, rt, consume=False):
        self.params, self.consume = params, consume


def test_model_releases_its_host_weights_to_an_engine(monkeypatch):
    from slimllm.jaxbackend import engine

    monkeypatch.setattr(engine, "Engine", StubEngine)
    model = slimllm.load(FIXTURES / "llama", weights="bfloat16")
    loaded = model.params
    made = model.engine()
    assert made.params is loaded and model._host is None  # no host copy beside the engine
    assert made.consume  # ... not even while it is being placed
    same_weights(model.params, loaded)  # the NumPy backend reads them again from the source
    assert model.params_for(slimllm.Runtime()) is model.params
    assert model.engine() is made

    other = model.engine(slimllm.Runtime(weights="int8"))  # another format: only the engine's
    same_weights(other.params, encode_params(loaded, weight_format("int8")))
    assert not model._formats and model._host is not None

    demo = slimllm.demo_model(model.cfg)  # no source: keeps its weights
    demo_params = demo.params
    assert not demo.engine().consume
    assert demo.params is demo_params
    model.params = init_params(model.cfg)  # assigned by hand: no longer the checkpoint's
    model._engines.clear()
    model.engine()
    assert model._host is not None


# Peak and current resident memory from /proc: VmHWM is the peak of this process's own memory.
# resource.getrusage(RUSAGE_SELF).ru_maxrss is not, here: Linux carries the parent's peak into a
# child started by vfork and exec (as subprocess does), and pytest's peak is the larger one.
MEASURE = textwrap.dedent(
    """
    import json, sys
    import slimllm
    from slimllm.reference.weight_format import weight_bytes

    def status(key):
        line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
        return int(line.split()[1]) * 1024  # kB

    before = status("VmRSS")
    model = slimllm.load(sys.argv[1], weights=None if sys.argv[2] == "None" else sys.argv[2])
    grown, stored = status("VmHWM") - before, weight_bytes(model.params)
    print(json.dumps(dict(weights=model.weights, grown=grown, weight_bytes=stored)))
    """
)

# What a load may take beyond its result: the encoder's transient (a block of rows, BLOCK bytes
# as float32 = 4 MiB: the rows read, their widening and about four float32 temporaries of the
# quantiser, ~24 MiB), the heap's slack and the library's header parsing. Measured: ~10 MiB for
# bfloat16, ~21 MiB for int8 (on top of 1.0 x the result). Keeping each file mapped for the
# whole load instead would have added the file's size (bf16: 621 MiB for a 305 MiB model).
OVERHEAD = 32 << 20


def llama_bf16_checkpoint(d, vocab=32000, width=1024, layers=8, ffn=2816):
    """A random Llama-shaped bf16 checkpoint in two shards (~305 MiB with the defaults)."""
    heads, kv, hd = 16, 8, 64
    config = dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        torch_dtype="bfloat16",
    )
    (d / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, width), "lm_head.weight": (vocab, width)}
    shapes["model.norm.weight"] = (width,)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (width,)}
        shapes |= {p + "post_attention_layernorm.weight": (width,)}
        shapes |= {p + "self_attn.q_proj.weight": (heads * hd, width)}
        shapes |= {p + f"self_attn.{n}_proj.weight": (kv * hd, width) for n in "kv"}
        shapes |= {p + "self_attn.o_proj.weight": (width, heads * hd)}
        shapes |= {p + f"mlp.{n}_proj.weight": (ffn, width) for n in ("gate", "up")}
        shapes |= {p + "mlp.down_proj.weight": (width, ffn)}
    rng = np.random.default_rng(0)
    names = list(shapes)
    shards = {"model-1.safetensors": names[1::2], "model-2.safetensors": names[::2]}
    for file, part in shards.items():
        tensors = {}
        for name in part:
            bits = rng.integers(0, 1 << 16, shapes[name], dtype=np.uint16)
            bits &= 0xBFFF  # exponent below 128: finite values, |x| < 2
            tensors[name] = bits.view(ml_dtypes.bfloat16)
        save_file(tensors, str(d / file))
    weight_map = {name: file for file, part in shards.items() for name in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(os.path.getsize(d / f) for f in shards)


@pytest.mark.slow
def test_loading_memory_is_the_result_plus_a_fixed_amount(tmp_path):
    """Peak resident memory of a load (a fresh process) minus that right before it."""
    d = tmp_path / "big"
    d.mkdir()
    try:
        file_bytes = llama_bf16_checkpoint(d)

        def measure(weights):
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            run = [sys.executable, "-c", MEASURE, str(d), weights]
            out = subprocess.run(run, capture_output=True, text=True, env=env, cwd=ROOT)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        native = measure("None")
        assert native["weights"] == "bfloat16"
        assert native["grown"] <= 1.1 * native["weight_bytes"] + OVERHEAD, native
        int8 = measure("int8")
        assert int8["grown"] <= 1.1 * int8["weight_bytes"] + OVERHEAD, int8
        assert int8["grown"] <= 0.6 * file_bytes + OVERHEAD, (int8, file_bytes)
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_scan_counts_non_finite_and_too_large_values_in_every_float_dtype(dtype):
    """The block check reads magnitudes from bit patterns: NaN, ±Inf and the largest value must
    come out right for each stored dtype, strided views and empty blocks included."""
    w = np.array([1.5, -3.25, 0.0, 2.0], dtype)
    assert stream.peak(w) == 3.25 and stream.peak(w[::2]) == 1.5 and stream.peak(w[:0]) == 0
    assert stream.scan(w) == (0, 0) and stream.scan(w, 2.0) == (0, 1)
    w[1], w[2] = np.nan, -np.inf
    assert stream.scan(w) == (2, 0) and stream.scan(w, 1.0) == (2, 2)
