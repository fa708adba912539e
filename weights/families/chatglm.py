"""ChatGLM-6B (v1): LayerNorm, 2-D RoPE, prefix-LM attention, GeLU MLP, alpha-scaled residual.

Upstream quirks reproduced (see the fixture's ORIGIN.md): the residual scale is sqrt(2 * 28)
whatever num_layers is (the modeling file never passes num_layers to its blocks); the rotary
inverse frequencies are rounded to float16; `query_key_value` rows are grouped per head as
[q_h | k_h | v_h]; `lm_head.weight` is stored but tied to the word embeddings at load.
Its tokenizer (SentencePiece `ice_text.model`, tokenization_chatglm.py) holds its specials as
pieces, appends [gMASK] <sop> to a prompt, and rewrites newlines, tabs and runs of spaces.
"""

import math

from slimllm.reference.config import MAX_LAYERS, ModelConfig

from ..transforms import split_per_head
from .common import Family, TokenizerRule, expect, flag, head_dim, hub_config, integer, number

LAYER = "transformer.layers.{i}."
UPSTREAM_LAYERS = 28  # the GLMBlock default num_layers that sets alpha


@hub_config
def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "quantization_bit", (0,), 0)  # int4/int8 weights: another layout
    expect(hf, "pre_seq_len", (None,), None)  # P-tuning prefix tokens
    heads = integer(hf, "num_attention_heads")
    width = integer(hf, "hidden_size")
    vocab = integer(hf, "vocab_size")

    def token(key):
        return integer(hf, key, low=0, high=vocab - 1)

    return ModelConfig(
        vocab=vocab,
        width=width,
        n_layers=integer(hf, "num_layers", high=MAX_LAYERS),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=head_dim(hf, width, heads, None),
        ffn_width=integer(hf, "inner_hidden_size", default=4 * width),
        max_len=integer(hf, "max_sequence_length", default=2048),
        norm="layer",
        norm_eps=number(hf, "layernorm_epsilon", default=1e-5, high=1.0),
        mlp="gelu",
        pos="rope2d" if flag(hf, "position_encoding_2d", default=True) else "rope",
        rope_f16_freqs=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        residual="normed_input",
        residual_alpha=math.sqrt(2 * UPSTREAM_LAYERS),
        tied_head=True,
        block_start_id=token("bos_token_id"),
        block_anchor_ids=(token("gmask_token_id"), token("mask_token_id")),
    )


FAMILY = Family(
    name="chatglm",
    detect=lambda hf: hf.get("model_type") == "chatglm" and "inner_hidden_size" in hf,
    config_from_hf=config_from_hf,
    names={
        "embed": "transformer.word_embeddings.weight",
        "final_norm": "transformer.final_layernorm.weight",
        "final_norm_b": "transformer.final_layernorm.bias",
        "layers.{i}.attn_norm": LAYER + "input_layernorm.weight",
        "layers.{i}.attn_norm_b": LAYER + "input_layernorm.bias",
        "layers.{i}.mlp_norm": LAYER + "post_attention_layernorm.weight",
        "layers.{i}.mlp_norm_b": LAYER + "post_attention_layernorm.bias",
        "layers.{i}.wo": LAYER + "attention.dense.weight",
        "layers.{i}.bo": LAYER + "attention.dense.bias",
        "layers.{i}.w_up": LAYER + "mlp.dense_h_to_4h.weight",
        "layers.{i}.b_up": LAYER + "mlp.dense_h_to_4h.bias",
        "layers.{i}.w_down": LAYER + "mlp.dense_4h_to_h.weight",
        "layers.{i}.b_down": LAYER + "mlp.dense_4h_to_h.bias",
    },
    fused={
        LAYER + "attention.query_key_value.weight": split_per_head("w"),
        LAYER + "attention.query_key_value.bias": split_per_head("b"),
    },
    # lm_head is tied to the embeddings at load upstream; rotary buffers are recomputed.
    ignored=("lm_head.weight", LAYER + "attention.rotary_emb.inv_freq"),
    # ChatGLM2/3 share the model_type and class name; this model holds [gMASK] as a piece itself.
    # tokenizer_config: bos <sop>, eos <eop>. HF splits its named specials (<sop>, <eop>, [MASK])
    # out of typed text; [gMASK] and [sMASK] are too here, where upstream spells them out.
    tokenizer=TokenizerRule(
        model_types=("chatglm",),
        classes=("chatglmtokenizer",),
        kinds=("sentencepiece",),
        own_piece="[gMASK]",
        sentencepiece_file="ice_text.model",
        suffix=("[gMASK]", "<sop>"),
        bos="<sop>",
        eos=("<eop>",),
        in_text=("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"),
        blanks=True,
    ),
)
