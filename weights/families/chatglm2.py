"""ChatGLM2 / ChatGLM3 (remote-code `ChatGLMModel`): RMSNorm, multi-query groups, q/k/v bias only,
RoPE on the first half of each head with interleaved pairs (2j, 2j+1), SwiGLU with a fused
[gate; up] projection, untied output layer; `query_key_value` fuses [all q | all k | all v].
GLM-4's remote-code checkpoints say the same model_type and load here too (`glm.py`: its -hf
layout and its tiktoken tokenizer).
"""

from slimllm.reference.config import MAX_LAYERS, ModelConfig

from ..transforms import gate_up_sizes, qkv_sizes, split_rows
from .common import Family, TokenizerRule, expect, flag, head_dim, hub_config, integer, number

LAYER = "transformer.encoder.layers.{i}."


@hub_config
def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "original_rope", (True,), True)
    expect(hf, "apply_residual_connection_post_layernorm", (False,), False)
    expect(hf, "rmsnorm", (True,), True)
    expect(hf, "add_bias_linear", (False,), False)
    expect(hf, "quantization_bit", (0,), 0)  # int4/int8 weights: another layout
    expect(hf, "pre_seq_len", (None,), None)  # P-tuning prefix tokens
    heads = integer(hf, "num_attention_heads")
    width = integer(hf, "hidden_size")
    grouped = flag(hf, "multi_query_attention")
    return ModelConfig(
        vocab=integer(hf, "padded_vocab_size", "vocab_size"),
        width=width,
        n_layers=integer(hf, "num_layers", high=MAX_LAYERS),
        n_heads=heads,
        n_kv_heads=integer(hf, "multi_query_group_num", high=heads) if grouped else heads,
        head_dim=head_dim(hf, width, heads, "kv_channels"),
        ffn_width=integer(hf, "ffn_hidden_size"),
        max_len=integer(hf, "seq_length", default=2048),
        norm_eps=number(hf, "layernorm_epsilon", default=1e-5, high=1.0),
        rope_style="interleaved",
        rope_fraction=0.5,
        rope_theta=10000.0 * number(hf, "rope_ratio", default=1.0),
        qkv_bias=flag(hf, "add_qkv_bias"),
        final_norm=flag(hf, "post_layer_norm", default=True),
    )


QKV = ("layers.{i}.wq", "layers.{i}.wk", "layers.{i}.wv")
QKV_B = ("layers.{i}.bq", "layers.{i}.bk", "layers.{i}.bv")
# tokenization_chatglm.py numbers these after the SentencePiece pieces.
SPECIALS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)  # fmt: skip

FAMILY = Family(
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
        LAYER + "mlp.dense_h_to_4h.weight": split_rows(gate_up_sizes),
    },
    ignored=("transformer.rotary_pos_emb.inv_freq",),
    # get_prefix_tokens() = [gMASK] sop; generation_config.json also stops on <|user|>,
    # <|observation|>. Upstream splits specials out of text only with encode_special_tokens=True
    # (default False: a typed "<|user|>" becomes ordinary pieces); a chat template typed as text
    # needs the real ids, so the bracketed ones are always recognised. Bare "sop"/"eop" are not:
    # they are ordinary words too.
    tokenizer=TokenizerRule(
        model_types=("chatglm",),
        classes=("chatglmtokenizer",),
        kinds=("sentencepiece",),
        prefix=("[gMASK]", "sop"),
        eos=("</s>", "<|user|>", "<|observation|>"),
        appended=SPECIALS,
        in_text=tuple(t for t in SPECIALS if t not in ("sop", "eop")),
    ),
)
