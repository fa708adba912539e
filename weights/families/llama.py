"""Llama 1/2/3/3.1 (and every checkpoint in the Hugging Face `LlamaForCausalLM` layout).

RMSNorm, rotate-half RoPE (theta from the config, Llama-3.1 "llama3" frequency scaling), GQA,
SwiGLU; the head is tied in the small Llama-3.2 models (no `lm_head.weight` in the file).
"""

from slimllm.reference.config import MAX_LAYERS, ModelConfig

from .common import (
    Family,
    TokenizerRule,
    expect,
    flag,
    head_dim,
    hub_config,
    integer,
    number,
    rope_settings,
)


@hub_config
def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "hidden_act", ("silu",), "silu")
    expect(hf, "pretraining_tp", (1,), 1)
    theta, scaling = rope_settings(hf)
    heads = integer(hf, "num_attention_heads")
    width = integer(hf, "hidden_size")
    return ModelConfig(
        vocab=integer(hf, "vocab_size"),
        width=width,
        n_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        n_heads=heads,
        n_kv_heads=integer(hf, "num_key_value_heads", default=heads, high=heads),
        head_dim=head_dim(hf, width, heads),
        ffn_width=integer(hf, "intermediate_size"),
        max_len=integer(hf, "max_position_embeddings", default=2048),
        norm_eps=number(hf, "rms_norm_eps", default=1e-6, high=1.0),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=flag(hf, "attention_bias"),
        o_bias=flag(hf, "attention_bias"),
        mlp_bias=flag(hf, "mlp_bias"),
        tied_head=flag(hf, "tie_word_embeddings"),
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
