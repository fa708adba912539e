"""Qwen (v1, remote-code `QWenLMHeadModel`): fused `c_attn` [q|k|v] with bias, no output bias,
and an MLP whose hub names are swapped relative to their roles: `c_proj(w1(x) * silu(w2(x)))`,
so w2 is the gate and w1 the up projection; `intermediate_size` is twice the FFN width.
Dynamic NTK (base scaled by an alpha fixed from the prompt length) and logN query scaling apply
past the trained `seq_length` when the config enables them. The tokenizer (tiktoken,
tokenization_qwen.py) adds nothing around a prompt and numbers 208 specials from 151643.
"""

from slimllm.reference.config import MAX_LAYERS, DynamicNTK, ModelConfig

from ..transforms import qkv_sizes, split_rows
from .common import (
    Family,
    HubConfigError,
    TokenizerRule,
    architectures,
    expect,
    flag,
    head_dim,
    hub_config,
    integer,
    number,
)

LAYER = "transformer.h.{i}."


@hub_config
def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "no_bias", (True,), True)  # biased projections: not supported
    expect(hf, "scale_attn_weights", (True,), True)  # scores divided by sqrt(d)
    heads = integer(hf, "num_attention_heads")
    width = integer(hf, "hidden_size")
    trained = integer(hf, "seq_length")
    fused_ffn = integer(hf, "intermediate_size")
    if fused_ffn % 2:
        raise HubConfigError(f"config.json intermediate_size={fused_ffn}: expected an even size")
    return ModelConfig(
        vocab=integer(hf, "vocab_size"),
        width=width,
        n_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=head_dim(hf, width, heads, "kv_channels"),
        ffn_width=fused_ffn // 2,
        max_len=integer(hf, "max_position_embeddings", default=trained),
        norm_eps=number(hf, "layer_norm_epsilon", default=1e-6, high=1.0),
        rope_theta=number(hf, "rotary_emb_base", default=10000.0, low=1.0),
        rope_fraction=number(hf, "rotary_pct", default=1.0, high=1.0),
        rope_scaling=DynamicNTK(trained) if flag(hf, "use_dynamic_ntk") else None,
        logn_len=trained if flag(hf, "use_logn_attn") else 0,
        qkv_bias=True,
        tied_head=flag(hf, "tie_word_embeddings"),
    )


# Pre-tokenizer split pattern of tokenization_qwen.py (PAT_STR); Qwen2's tokenizer.json has it too.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)
QKV = ("layers.{i}.wq", "layers.{i}.wk", "layers.{i}.wv")
QKV_B = ("layers.{i}.bq", "layers.{i}.bk", "layers.{i}.bv")

FAMILY = Family(
    name="qwen",
    detect=lambda hf: hf.get("model_type") == "qwen" or "QWenLMHeadModel" in architectures(hf),
    config_from_hf=config_from_hf,
    names={
        "embed": "transformer.wte.weight",
        "final_norm": "transformer.ln_f.weight",
        "lm_head": "lm_head.weight",
        "layers.{i}.attn_norm": LAYER + "ln_1.weight",
        "layers.{i}.mlp_norm": LAYER + "ln_2.weight",
        "layers.{i}.wo": LAYER + "attn.c_proj.weight",
        "layers.{i}.w_up": LAYER + "mlp.w1.weight",
        "layers.{i}.w_gate": LAYER + "mlp.w2.weight",
        "layers.{i}.w_down": LAYER + "mlp.c_proj.weight",
    },
    fused={
        LAYER + "attn.c_attn.weight": split_rows(qkv_sizes(QKV)),
        LAYER + "attn.c_attn.bias": split_rows(qkv_sizes(QKV_B)),
    },
    tokenizer=TokenizerRule(
        model_types=("qwen",),
        classes=("qwentokenizer",),
        kinds=("tiktoken",),
        tiktoken_size=151643,
        # generation_config eos <|endoftext|>; chat() also stops on <|im_end|> and <|im_start|>.
        eos=("<|endoftext|>", "<|im_end|>", "<|im_start|>"),
        appended=SPECIALS,
        pattern=PATTERN,
        nfc=True,
    ),
)
