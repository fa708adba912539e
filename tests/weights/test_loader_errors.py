"""Strict loading: every bad checkpoint gives a clear error naming the problem."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import slimllm
from conftest import FIXTURES, rel_err
from slimllm.weights.io import CheckpointError


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the llama fixture: (directory, config dict, tensors dict)."""
    src = FIXTURES / "llama"
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(src / name, tmp_path / name)
    return (
        tmp_path,
        json.loads((src / "config.json").read_text()),
        load_file(src / "model.safetensors"),
    )


def rewrite(directory, config=None, tensors=None):
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(directory / "model.safetensors"))


def test_missing_tensor(ckpt):
    d, _, tensors = ckpt
    del tensors["model.layers.1.mlp.up_proj.weight"]
    rewrite(d, tensors=tensors)
    with pytest.raises(
        CheckpointError, match=rf"{d}: missing tensor model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        slimllm.load(d)


def test_unexpected_tensor(ckpt):
    d, _, tensors = ckpt
    tensors["model.layers.0.self_attn.mystery.weight"] = np.zeros(3, np.float32)
    rewrite(d, tensors=tensors)
    with pytest.raises(CheckpointError, match=rf"{d}: unexpected tensor.*mystery"):
        slimllm.load(d)


def test_wrong_shape(ckpt):
    d, _, tensors = ckpt
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    rewrite(d, tensors=tensors)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight has "
        r"shape \(16, 64\), expected \(32, 64\) for layers\.0\.wk",
    ):
        slimllm.load(d)


@pytest.mark.parametrize(
    ("fixture", "name", "shape", "message"),
    [  # "cannot reshape array of size 0" and tracebacks from the splitters before (the first
        # name is the checkpoint's, the layer number included)
        (
            "chatglm6b",
            "transformer.layers.0.attention.query_key_value.weight",
            (0, 64),
            r"fused tensor of shape \(0, 64\), expected 192 rows",
        ),
        (
            "chatglm6b",
            "transformer.layers.0.attention.query_key_value.bias",
            (),
            r"fused tensor of shape \(\), expected 192 rows",
        ),
        (
            "qwen1",
            "transformer.h.0.attn.c_attn.weight",
            (),
            r"fused tensor of shape \(\), expected 192 rows \(layers\.\{i\}\.wq=64",
        ),
        (
            "qwen1",
            "transformer.h.0.attn.c_attn.weight",
            (1, 192, 64),
            r"fused tensor of shape \(1, 192, 64\), expected 192 rows",
        ),
        (
            "qwen1",
            "transformer.h.0.attn.c_attn.weight",
            (192, 64, 1),
            r"fused tensor of shape \(192, 64, 1\), .* at most 2 dims",
        ),
        (
            "glm",
            "model.layers.0.mlp.gate_up_proj.weight",
            (256, 64, 1),
            r"fused tensor of shape \(256, 64, 1\), expected 256 rows",
        ),
        ("llama", "model.norm.weight", (64, 1), r"has shape \(64, 1\), expected \(64,\)"),
        ("llama", "lm_head.weight", (), r"has shape \(\), expected \(256, 64\) for lm_head"),
    ],
)
def test_tensor_of_the_wrong_rank_is_named(tmp_path, fixture, name, shape, message):
    """A tensor of the wrong rank or size, fused or not, is refused naming it and its shape."""
    shutil.copy(FIXTURES / fixture / "config.json", tmp_path / "config.json")
    tensors = load_file(FIXTURES / fixture / "model.safetensors")
    tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} .*{message}"):
        slimllm.load(tmp_path)


def test_integer_tensor_where_a_weight_is_needed(ckpt):
    d, _, tensors = ckpt
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name].view(np.int32)
    rewrite(d, tensors=tensors)
    with pytest.raises(CheckpointError, match=rf"tensor {name} is stored as int32, but layers"):
        slimllm.load(d)


def test_unknown_model_type(ckpt):
    d, config, _ = ckpt
    rewrite(d, config={**config, "model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    with pytest.raises(CheckpointError, match="unsupported model type 'mamba'"):
        slimllm.load(d)


def test_unknown_config_values(ckpt):
    d, config, _ = ckpt
    rewrite(d, config={**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="rope scaling type 'yarn'"):
        slimllm.load(d)
    rewrite(d, config={**config, "hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="hidden_act='gelu'"):
        slimllm.load(d)
    del config["num_hidden_layers"]
    rewrite(d, config=config)
    with pytest.raises(CheckpointError, match="lacks num_hidden_layers"):
        slimllm.load(d)


def test_truncated_safetensors(ckpt):
    d, _, _ = ckpt
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        slimllm.load(d)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        slimllm.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        slimllm.load(tmp_path)


def test_sharded_safetensors_and_rope_parameters(ckpt):
    """A sharded index and the newer `rope_parameters` config form load to the same model."""
    d, config, tensors = ckpt
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    (d / "model.safetensors").unlink()
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(d / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    rewrite(d, config=config)
    model = slimllm.load(d)
    ref = slimllm.load(FIXTURES / "llama")
    assert model.cfg == ref.cfg
    out = slimllm.generate(model, ids=[1, 5, 9], max_new_tokens=4, eos_ids=())
    assert out.ids == slimllm.generate(ref, ids=[1, 5, 9], max_new_tokens=4, eos_ids=()).ids
    assert rel_err(model.params.layers[1].w_down, ref.params.layers[1].w_down) == 0


def test_bf16_and_f16_safetensors_keep_their_dtype(tmp_path):
    """Half-precision tensors are read as stored (bf16 as ml_dtypes.bfloat16, whose float32
    widening is the bit shift)."""
    from slimllm.weights.io import lazy_safetensors

    x = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    header = {
        "a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(
        len(raw).to_bytes(8, "little") + raw + bits.tobytes() + x.astype(np.float16).tobytes()
    )
    t = lazy_safetensors(path)
    a, b = t["a"].read(), t["b"].read()
    assert t["a"].dtype.name == a.dtype.name == "bfloat16"
    assert t["b"].dtype == b.dtype == np.float16
    np.testing.assert_array_equal(a.view(np.uint16), bits)
    np.testing.assert_array_equal(
        a.astype(np.float32), (bits.astype(np.uint32) << 16).view(np.float32)
    )
    np.testing.assert_array_equal(b, x.astype(np.float16))
    np.testing.assert_array_equal(t["a"].read(1, 3).view(np.uint16), bits[1:3])


def test_pytorch_bin_checkpoint_loads_like_safetensors(ckpt):
    """A pytorch_model.bin (torch zip layout, written without torch) gives identical weights."""
    from slimllm.weights.torch_bin_write import write_torch_bin

    d, _, tensors = ckpt
    (d / "model.safetensors").unlink()
    write_torch_bin(d / "pytorch_model.bin", tensors)
    model, ref = slimllm.load(d), slimllm.load(FIXTURES / "llama")
    for a, b in zip(model.params.layers, ref.params.layers):
        np.testing.assert_array_equal(a.wq, b.wq)
        np.testing.assert_array_equal(a.w_down, b.w_down)
    np.testing.assert_array_equal(model.params.lm_head, ref.params.lm_head)


def test_pickle_calling_another_global_is_rejected(ckpt):
    import zipfile

    from slimllm.weights.torch_bin import UnsafePickleError

    d, _, _ = ckpt
    (d / "model.safetensors").unlink()
    payload = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."  # os.system("true")
    with zipfile.ZipFile(d / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    with pytest.raises(UnsafePickleError, match="os.system"):
        slimllm.load(d)


@pytest.mark.parametrize(
    ("file", "key", "value", "message"),
    [
        ("generation_config.json", "eos_token_id", 256, r"eos_token_id 256 is not a token id"),
        ("generation_config.json", "eos_token_id", [2, -1], r"eos_token_id \[2, -1\] is not a"),
        ("generation_config.json", "eos_token_id", "2", r"eos_token_id '2' is not a token id"),
        ("generation_config.json", "eos_token_id", 2.0, r"eos_token_id 2.0 is not a token id"),
        ("generation_config.json", "eos_token_id", [True], r"eos_token_id \[True\] is not a"),
        ("generation_config.json", "bos_token_id", 9038, r"bos_token_id 9038 is not a token id"),
        ("generation_config.json", "bos_token_id", [1, 2], r"bos_token_id \[1, 2\] must be one"),
        ("config.json", "eos_token_id", 300, r"eos_token_id 300 is not a token id"),
    ],
)
def test_special_ids_outside_the_vocabulary_or_of_the_wrong_type(ckpt, file, key, value, message):
    """EOS/BOS ids are integers inside the model's vocabulary of 256, whichever file has them."""
    d, config, _ = ckpt
    gen = json.loads((d / "generation_config.json").read_text())
    if file == "config.json":
        gen.pop(key)
        rewrite(d, config={**config, key: value})
    else:
        gen[key] = value
    (d / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(CheckpointError, match=rf"{file}: {message}") as e:
        slimllm.load(d)
    assert "an integer in [0, 256)" in str(e.value) or "must be one id" in str(e.value)


def test_special_ids_in_range_load(ckpt):
    d, _, _ = ckpt
    (d / "generation_config.json").write_text('{"eos_token_id": [2, 255], "bos_token_id": 0}')
    model = slimllm.load(d)
    assert (model.eos_ids, model.bos_id) == ((2, 255), 0)


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("config.json", "a JSON file"),
        ("generation_config.json", "a JSON file"),
        ("model.safetensors", "one weight file of a Hugging Face checkpoint"),
    ],
)
def test_a_file_of_a_checkpoint_is_not_taken_for_a_llama2c_file(ckpt, name, what):
    """`--model config.json` said "implausible llama2.c header 7b0a2020..."."""
    d, _, _ = ckpt
    with pytest.raises(
        CheckpointError,
        match=rf"{name}: {what}, not a model: pass a checkpoint directory \(here {d}\) or a "
        r"llama2\.c \.bin file",
    ):
        slimllm.load(d / name)


def test_pytorch_bin_file_is_not_taken_for_a_llama2c_file(ckpt):
    from slimllm.weights.torch_bin_write import write_torch_bin

    d, _, tensors = ckpt
    write_torch_bin(d / "pytorch_model.bin", tensors)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: one weight file of a Hugging"):
        slimllm.load(d / "pytorch_model.bin")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
@pytest.mark.parametrize("text", ["[1, 2]", "7", '"x"', "{nope"])
def test_config_files_that_are_not_json_objects(ckpt, name, text):
    d, _, _ = ckpt
    (d / name).write_text(text)
    with pytest.raises(
        CheckpointError, match=rf"{name}: (a JSON \w+, expected an object|not valid)"
    ):
        slimllm.load(d)


def test_llama2c_files_whose_first_bytes_look_like_other_formats_still_load(tmp_path):
    """dim 128 starts with 0x80 (a pickle's first byte), dim 640 with 0x80 0x02 (a pickle of
    protocol 2): still llama2.c headers."""
    from slimllm.weights import load_config

    for dim in (128, 640):
        header = np.array([dim, 64, 1, 4, 1, 8, 16], np.int32)
        (tmp_path / "m.bin").write_bytes(header.tobytes())
        assert load_config(tmp_path / "m.bin").width == dim
