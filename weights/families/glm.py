"""GLM-4 `-hf` (native `GlmForCausalLM`): the Llama layout with ChatGLM2's maths (q/k/v bias only,
interleaved RoPE on part of each head) and a fused [gate | up] MLP projection.

GLM-4's tokenizer (tokenization_chatglm.py `ChatGLM4Tokenizer`) is tiktoken with 14 specials
numbered after the ranks and [gMASK] <sop> before a prompt; the remote-code GLM-4 checkpoints
(model_type `chatglm`, loaded as `chatglm2`) ship it too, so a tiktoken file under ChatGLM's
model_type or class name is read with this rule.
"""

from slimllm.reference.config import ModelConfig

from ..transforms import gate_up_sizes, split_rows
from . import llama, qwen
from .common import Family, TokenizerRule, flag, hub_config, number


@hub_config
def config_from_hf(hf: dict) -> ModelConfig:
    return llama.config_from_hf(hf).replace(
        rope_style="interleaved",
        rope_fraction=number(hf, "partial_rotary_factor", default=0.5, high=1.0),
        qkv_bias=flag(hf, "attention_bias"),
        o_bias=False,
    )


# tokenization_chatglm.py numbers these after the tiktoken ranks.
SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip

FAMILY = Family(
    name="glm",
    detect=lambda hf: hf.get("model_type") == "glm",
    config_from_hf=config_from_hf,
    names=llama.NAMES,
    fused={llama.LAYER + "mlp.gate_up_proj.weight": split_rows(gate_up_sizes)},
    # generation_config stops on <|endoftext|>, <|user|>, <|observation|>.
    tokenizer=TokenizerRule(
        model_types=("glm", "glm4", "chatglm"),
        classes=("chatglm4tokenizer", "chatglmtokenizer"),
        kinds=("tiktoken",),
        tiktoken_size=151329,
        prefix=("[gMASK]", "<sop>"),
        eos=("<|endoftext|>", "<|user|>", "<|observation|>"),
        appended=SPECIALS,
        # Qwen's pattern with digits grouped up to three.
        pattern=qwen.PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|"),
    ),
)
