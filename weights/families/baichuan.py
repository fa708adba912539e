"""Baichuan-7B, Baichuan-13B, Baichuan2-7B/13B: the Llama block with a fused `W_pack` [q|k|v].

The variants differ in positions and head, told apart by keys their hub configs carry (the
fixtures' ORIGIN.md documents the rule): `max_position_embeddings` present -> RoPE (7B models),
only `model_max_length` -> ALiBi (13B models); Baichuan2 (`tokenizer_class` BaichuanTokenizer, or
its 125696-token vocabulary) -> NormHead (`weights.transforms.norm_head`). All four share one
tokenizer (SentencePiece, tokenization_baichuan.py), with Llama's conventions.
"""

from slimllm.reference.config import MAX_LAYERS, ModelConfig

from ..transforms import norm_head, qkv_sizes, split_rows
from . import llama
from .common import Family, TokenizerRule, expect, flag, head_dim, hub_config, integer, number

BAICHUAN2_VOCAB = 125696


def is_baichuan2(hf: dict) -> bool:
    return (
        hf.get("tokenizer_class") == "BaichuanTokenizer" or hf.get("vocab_size") == BAICHUAN2_VOCAB
    )


@hub_config
def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "hidden_act", ("silu",), "silu")
    rope = "max_position_embeddings" in hf
    heads = integer(hf, "num_attention_heads")
    width = integer(hf, "hidden_size")
    return ModelConfig(
        vocab=integer(hf, "vocab_size"),
        width=width,
        n_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=head_dim(hf, width, heads, None),
        ffn_width=integer(hf, "intermediate_size"),
        max_len=integer(hf, "max_position_embeddings" if rope else "model_max_length"),
        norm_eps=number(hf, "rms_norm_eps", default=1e-6, high=1.0),
        pos="rope" if rope else "alibi",
        tied_head=flag(hf, "tie_word_embeddings"),
    )


QKV = ("layers.{i}.wq", "layers.{i}.wk", "layers.{i}.wv")
# Llama's <s> first by default; Baichuan2's tokenizer_config sets add_bos_token false.
TOKENIZER = TokenizerRule(
    model_types=("baichuan",),
    classes=("baichuantokenizer",),
    kinds=("sentencepiece",),
    bos="<s>",
    add_bos=True,
    eos=("</s>",),
    in_text=("<s>", "</s>", "<unk>"),
)


def family(name, detect, transforms):
    return Family(
        name=name,
        detect=detect,
        config_from_hf=config_from_hf,
        names=llama.NAMES,
        fused={llama.LAYER + "self_attn.W_pack.weight": split_rows(qkv_sizes(QKV))},
        transforms=transforms,
        ignored=(llama.LAYER + "self_attn.rotary_emb.inv_freq",),
        tokenizer=TOKENIZER,
    )


BAICHUAN = family(
    "baichuan", lambda hf: hf.get("model_type") == "baichuan" and not is_baichuan2(hf), {}
)
BAICHUAN2 = family(
    "baichuan2",
    lambda hf: hf.get("model_type") == "baichuan" and is_baichuan2(hf),
    {"lm_head": norm_head},
)
