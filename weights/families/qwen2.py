"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) and Qwen3 (`Qwen3ForCausalLM`): the Llama layout plus
q/k/v biases (Qwen2) or per-head q/k RMSNorm with an explicit head_dim (Qwen3)."""

from ..convert import Family
from ..io import CheckpointError
from . import llama

LAYER = llama.LAYER


def config_from_hf(hf: dict):
    if hf.get("use_sliding_window") and hf.get("sliding_window", 0) < hf.get(
        "max_position_embeddings", 0
    ):
        raise CheckpointError("config.json use_sliding_window=true is not supported")
    cfg = llama.config_from_hf(hf)
    if hf["model_type"] == "qwen2":
        return cfg.replace(qkv_bias=True, o_bias=False)
    return cfg.replace(qk_norm=True)


NAMES = {
    **llama.NAMES,
    "layers.{i}.q_norm": LAYER + "self_attn.q_norm.weight",
    "layers.{i}.k_norm": LAYER + "self_attn.k_norm.weight",
}
TINY = {**llama.FAMILY.tiny, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True}

QWEN2 = Family(
    name="qwen2",
    detect=lambda hf: hf.get("model_type") == "qwen2",
    config_from_hf=config_from_hf,
    names=NAMES,
    tiny={**TINY, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
)
QWEN3 = Family(
    name="qwen3",
    detect=lambda hf: hf.get("model_type") == "qwen3",
    config_from_hf=config_from_hf,
    names=NAMES,
    tiny={**TINY, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32},
)
