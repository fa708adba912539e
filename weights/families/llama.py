"""Llama 1/2/3/3.1 (and every checkpoint in the Hugging Face `LlamaForCausalLM` layout).

RMSNorm, rotate-half RoPE (theta from the config, Llama-3.1 "llama3" frequency scaling), GQA,
SwiGLU; the head is tied in the small Llama-3.2 models (no `lm_head.weight` in the file).
"""

from slimllm.reference.config import ModelConfig

from .common import Family, TokenizerRule, expect, require, rope_settings


def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "hidden_act", ("silu",), "silu")
    expect(hf, "pretraining_tp", (1,), 1)
    theta, scaling = rope_settings(hf)
    heads = require(hf, "num_attention_heads")
    width = require(hf, "hidden_size")
    return ModelConfig(
        vocab=require(hf, "vocab_size"),
        width=width,
        n_layers=require(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or width // heads,
        ffn_width=require(hf, "intermediate_size"),
        max_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tied_head=bool(hf.get("tie_word_embeddings", False)),
    )


LAYER = "model.layers.{i}."
NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{i}.attn_norm": LAYER + "input_layernorm.weight",
    "layers.{i}.mlp_norm": LAYER + "post_attention_layernorm.weight",
    **{f"layers.{{i}}.w{n}": LAYER + f"self_attn.{n}_proj.weight" for n in "qkvo"},
    **{f"layers.{{i}}.b{n}": LAYER + f"self_attn.{n}_proj.bias" for n in "qkvo"},
    "layers.{i}.w_gate": LAYER + "mlp.gate_proj.weight",
    "layers.{i}.w_up": LAYER + "mlp.up_proj.weight",
    "layers.{i}.w_down": LAYER + "mlp.down_proj.weight",
    "layers.{i}.b_up": LAYER + "mlp.up_proj.bias",
    "layers.{i}.b_down": LAYER + "mlp.down_proj.bias",
}

# LlamaTokenizer: <s> first when add_bos_token (default true). A bare SentencePiece model that no
# config names a family for is read this way too.
TOKENIZER = TokenizerRule(
    model_types=("llama", "mistral"),
    classes=("llamatokenizer", "codellamatokenizer"),
    kinds=("sentencepiece",),
    default_for=("sentencepiece",),
    bos="<s>",
    add_bos=True,
    eos=("</s>",),
    in_text=("<s>", "</s>", "<unk>"),
)

FAMILY = Family(
    name="llama",
    detect=lambda hf: hf.get("model_type") == "llama",
    config_from_hf=config_from_hf,
    names=NAMES,
    # Older exports store the rotary cache; it is recomputed from the config.
    ignored=(LAYER + "self_attn.rotary_emb.inv_freq",),
    tokenizer=TOKENIZER,
)
