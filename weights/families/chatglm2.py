"""ChatGLM2 / ChatGLM3 (remote-code names) and GLM-4 `-hf` (native `glm`): the same maths.

RMSNorm, multi-query groups, q/k/v bias only, RoPE on the first half of each head with
interleaved pairs (2j, 2j+1), SwiGLU with a fused [gate; up] projection, untied output layer.
ChatGLM2/3 fuse [all q | all k | all v] in `query_key_value`; GLM-4-hf splits them.
"""

from slimllm.reference.config import ModelConfig

from ..convert import Family, qkv_sizes, split_rows
from . import llama
from .common import expect, require

LAYER = "transformer.encoder.layers.{i}."


def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "original_rope", (True,), True)
    expect(hf, "apply_residual_connection_post_layernorm", (False,), False)
    expect(hf, "rmsnorm", (True,), True)
    expect(hf, "add_bias_linear", (False,), False)
    heads = require(hf, "num_attention_heads")
    width = require(hf, "hidden_size")
    kv = hf["multi_query_group_num"] if hf.get("multi_query_attention") else heads
    return ModelConfig(
        vocab=require(hf, "padded_vocab_size", "vocab_size"),
        width=width,
        n_layers=require(hf, "num_layers"),
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=hf.get("kv_channels") or width // heads,
        ffn_width=require(hf, "ffn_hidden_size"),
        max_len=hf.get("seq_length", 2048),
        norm_eps=hf.get("layernorm_epsilon", 1e-5),
        rope_style="interleaved",
        rope_fraction=0.5,
        rope_theta=10000.0 * hf.get("rope_ratio", 1),
        qkv_bias=bool(hf.get("add_qkv_bias", False)),
        final_norm=bool(hf.get("post_layer_norm", True)),
    )


def glm_config_from_hf(hf: dict) -> ModelConfig:
    cfg = llama.config_from_hf(hf)
    return cfg.replace(
        rope_style="interleaved",
        rope_fraction=float(hf.get("partial_rotary_factor", 0.5)),
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=False,
    )


def gate_up(cfg):
    return {"layers.{i}.w_gate": cfg.ffn_width, "layers.{i}.w_up": cfg.ffn_width}


QKV = ("layers.{i}.wq", "layers.{i}.wk", "layers.{i}.wv")
QKV_B = ("layers.{i}.bq", "layers.{i}.bk", "layers.{i}.bv")

CHATGLM2 = Family(
    name="chatglm2",
    detect=lambda hf: hf.get("model_type") == "chatglm" and "inner_hidden_size" not in hf,
    config_from_hf=config_from_hf,
    names={
        "embed": "transformer.embedding.word_embeddings.weight",
        "final_norm": "transformer.encoder.final_layernorm.weight",
        "lm_head": "transformer.output_layer.weight",
        "layers.{i}.attn_norm": LAYER + "input_layernorm.weight",
        "layers.{i}.mlp_norm": LAYER + "post_attention_layernorm.weight",
        "layers.{i}.wo": LAYER + "self_attention.dense.weight",
        "layers.{i}.w_down": LAYER + "mlp.dense_4h_to_h.weight",
    },
    fused={
        LAYER + "self_attention.query_key_value.weight": split_rows(qkv_sizes(QKV)),
        LAYER + "self_attention.query_key_value.bias": split_rows(qkv_sizes(QKV_B)),
        LAYER + "mlp.dense_h_to_4h.weight": split_rows(gate_up),
    },
    ignored=("transformer.rotary_pos_emb.inv_freq",),
    tiny={
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "padded_vocab_size": 256,
        "hidden_size": 64,
        "ffn_hidden_size": 128,
        "kv_channels": 16,
        "num_layers": 2,
        "num_attention_heads": 4,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "rmsnorm": True,
        "post_layer_norm": True,
        "layernorm_epsilon": 1e-5,
        "seq_length": 256,
    },
)

GLM = Family(
    name="glm",
    detect=lambda hf: hf.get("model_type") == "glm",
    config_from_hf=glm_config_from_hf,
    names=llama.NAMES,
    fused={llama.LAYER + "mlp.gate_up_proj.weight": split_rows(gate_up)},
    tiny={
        **llama.FAMILY.tiny,
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "head_dim": 16,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "rms_norm_eps": 1e-6,
    },
)
