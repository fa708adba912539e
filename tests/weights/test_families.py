"""The family registry (weights/families): every family is covered by an upstream-made fixture,
and a family name means the same thing to the loader and to the tokenizer."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, need
from slimllm.weights import load_checkpoint
from slimllm.weights.families import FAMILIES, detect
from slimllm.weights.io import CheckpointError
from slimllm.weights.tokenizer import _named_families


def fixture_configs():
    return {p.parent.name: json.loads(p.read_text()) for p in need(FIXTURES).glob("*/config.json")}


def test_every_family_is_detected_from_an_upstream_fixture():
    """So test_oracles.py checks every family's loader against its upstream implementation."""
    found = {detect(config).name for config in fixture_configs().values()}
    assert found == {family.name for family in FAMILIES}


def test_a_checkpoint_config_names_its_own_family_to_the_tokenizer():
    for variant, config in fixture_configs().items():
        named = [name for name, _ in _named_families({}, config)]
        assert detect(config).name in named, (variant, named)


@pytest.mark.parametrize(
    "variant, tensor, change",
    [
        ("qwen1", "transformer.h.{i}.attn.c_attn.weight", lambda w: np.array(1, w.dtype)),
        ("qwen1", "transformer.h.{i}.attn.c_attn.weight", lambda w: w[None]),
        ("chatglm6b", "transformer.layers.{i}.attention.query_key_value.weight", lambda w: w[:0]),
        ("chatglm6b", "transformer.layers.{i}.attention.query_key_value.weight", lambda w: w[0]),
        ("chatglm6b", "transformer.layers.{i}.attention.query_key_value.bias", lambda w: w[None]),
        ("glm", "model.layers.{i}.mlp.gate_up_proj.weight", lambda w: w[:, :, None]),
    ],
    ids=["qwen-scalar", "qwen-3d", "chatglm-empty", "chatglm-1d", "chatglm-bias-2d", "glm-3d"],
)
def test_a_fused_tensor_of_the_wrong_rank_or_size_is_named(tmp_path, variant, tensor, change):
    """Splitters used to fail with "cannot reshape array of size 0" or an IndexError."""
    d = tmp_path / variant
    shutil.copytree(FIXTURES / variant, d)
    tensors = load_file(d / "model.safetensors")
    name = tensor.format(i=1)
    tensors[name] = np.ascontiguousarray(change(tensors[name]))
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(tensor)}: fused tensor of shape"):
        load_checkpoint(d, tokenizer=False)
