"""OPT (`OPTForCausalLM`): LayerNorm with bias, learned positions with an offset of 2, ReLU MLP,
biases everywhere, tied head. opt-350m is post-LN (`do_layer_norm_before` false, no final norm)
and embeds in a smaller space with `project_in` / `project_out`.

The facebook/opt-* hub files were written from `OPTModel`, so names start at `decoder.`;
checkpoints saved from `OPTForCausalLM` prefix `model.` and add a tied `lm_head.weight`. Both
load: the prefix is dropped and the tied head is ignored.
"""

from slimllm.reference.config import MAX_LAYERS, ModelConfig

from .common import Family, TokenizerRule, expect, flag, head_dim, hub_config, integer

LAYER = "decoder.layers.{i}."


@hub_config
def config_from_hf(hf: dict) -> ModelConfig:
    expect(hf, "activation_function", ("relu",), "relu")
    expect(hf, "enable_bias", (True,), True)
    expect(hf, "layer_norm_elementwise_affine", (True,), True)
    pre = flag(hf, "do_layer_norm_before", default=True)
    width = integer(hf, "hidden_size")
    heads = integer(hf, "num_attention_heads")
    embed_width = integer(hf, "word_embed_proj_dim", default=width)
    return ModelConfig(
        vocab=integer(hf, "vocab_size"),
        width=width,
        n_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=head_dim(hf, width, heads, None),
        ffn_width=integer(hf, "ffn_dim"),
        max_len=integer(hf, "max_position_embeddings"),
        norm="layer",
        norm_eps=1e-5,
        mlp="relu",
        pos="learned",
        pos_offset=2,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        residual="pre_norm" if pre else "post_norm",
        final_norm=pre and not flag(hf, "_remove_final_layer_norm"),
        tied_head=True,
        embed_width=embed_width if embed_width != width else 0,
    )


NAMES = {
    "embed": "decoder.embed_tokens.weight",
    "pos_embed": "decoder.embed_positions.weight",
    "proj_in": "decoder.project_in.weight",
    "proj_out": "decoder.project_out.weight",
    "final_norm": "decoder.final_layer_norm.weight",
    "final_norm_b": "decoder.final_layer_norm.bias",
    "layers.{i}.attn_norm": LAYER + "self_attn_layer_norm.weight",
    "layers.{i}.attn_norm_b": LAYER + "self_attn_layer_norm.bias",
    "layers.{i}.mlp_norm": LAYER + "final_layer_norm.weight",
    "layers.{i}.mlp_norm_b": LAYER + "final_layer_norm.bias",
    **{f"layers.{{i}}.w{n}": LAYER + f"self_attn.{n}_proj.weight" for n in "qkv"},
    **{f"layers.{{i}}.b{n}": LAYER + f"self_attn.{n}_proj.bias" for n in "qkv"},
    "layers.{i}.wo": LAYER + "self_attn.out_proj.weight",
    "layers.{i}.bo": LAYER + "self_attn.out_proj.bias",
    "layers.{i}.w_up": LAYER + "fc1.weight",
    "layers.{i}.b_up": LAYER + "fc1.bias",
    "layers.{i}.w_down": LAYER + "fc2.weight",
    "layers.{i}.b_down": LAYER + "fc2.bias",
}

FAMILY = Family(
    name="opt",
    detect=lambda hf: hf.get("model_type") == "opt",
    config_from_hf=config_from_hf,
    names=NAMES,
    ignored=("lm_head.weight",),
    rename=lambda name: name.removeprefix("model."),
    # OPT ships GPT2Tokenizer (vocab.json + merges.txt) with add_bos_token and bos </s>.
    tokenizer=TokenizerRule(
        model_types=("opt",), kinds=("bpe-vocab-merges",), bos="</s>", add_bos=True, eos=("</s>",)
    ),
)
