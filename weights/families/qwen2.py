"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) and Qwen3 (`Qwen3ForCausalLM`): the Llama layout plus
q/k/v biases (Qwen2) or per-head q/k RMSNorm with an explicit head_dim (Qwen3). Both ship the
Qwen2Tokenizer (byte-level BPE with Qwen's split pattern), which adds nothing around a prompt."""

from . import llama, qwen
from .common import Family, TokenizerRule, hub_config

LAYER = llama.LAYER


@hub_config
def config_from_hf(hf: dict):
    # A sliding window shorter than the context is refused by `hub_config`.
    cfg = llama.config_from_hf(hf)
    if hf["model_type"] == "qwen2":
        return cfg.replace(qkv_bias=True, o_bias=False)
    return cfg.replace(qk_norm=True)


NAMES = {
    **llama.NAMES,
    "layers.{i}.q_norm": LAYER + "self_attn.q_norm.weight",
    "layers.{i}.k_norm": LAYER + "self_attn.k_norm.weight",
}


def tokenizer(model_types, classes=()):
    # Chat models' generation_config stops on <|im_end|>, <|endoftext|>.
    return TokenizerRule(
        model_types=model_types,
        classes=classes,
        kinds=("bpe-vocab-merges",),
        eos=("<|im_end|>", "<|endoftext|>"),
        pattern=qwen.PATTERN,
        nfc=True,
    )


QWEN2 = Family(
    name="qwen2",
    detect=lambda hf: hf.get("model_type") == "qwen2",
    config_from_hf=config_from_hf,
    names=NAMES,
    tokenizer=tokenizer(("qwen2", "qwen2_moe"), ("qwen2tokenizer",)),
)
QWEN3 = Family(
    name="qwen3",
    detect=lambda hf: hf.get("model_type") == "qwen3",
    config_from_hf=config_from_hf,
    names=NAMES,
    tokenizer=tokenizer(("qwen3", "qwen3_moe")),
)
