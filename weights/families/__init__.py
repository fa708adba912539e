"""The registry of model families: one file each, declarative (see `common.Family`).

A family's name is the same for the loader and the tokenizer (`Family.tokenizer`). Adding a
family that needs no new maths is one file plus one line in `FAMILIES`; the order matters only
where tokenizer names overlap (ChatGLM's model_type covers three families: v1, 2/3, GLM-4).
"""

from __future__ import annotations

from slimllm.reference.config import shown

from ..io import CheckpointError
from . import baichuan, chatglm, chatglm2, glm, llama, opt, qwen, qwen2
from .common import json_object

FAMILIES = [
    llama.FAMILY,
    qwen.FAMILY,
    qwen2.QWEN2,
    qwen2.QWEN3,
    chatglm.FAMILY,
    chatglm2.FAMILY,
    glm.FAMILY,
    baichuan.BAICHUAN,
    baichuan.BAICHUAN2,
    opt.FAMILY,
]


def detect(hf: dict):
    """The family of a hub config.json, from `model_type`, `architectures` and `auto_map`."""
    json_object(hf)
    for family in FAMILIES:
        if family.detect(hf):
            return family
    what = shown(hf.get("model_type") or hf.get("architectures") or "no model_type")
    supported = sorted({f.name for f in FAMILIES})
    raise CheckpointError(f"unsupported model type {what} (supported families: {supported})")


def by_name(name: str):
    for family in FAMILIES:
        if family.name == name:
            return family
    raise CheckpointError(f"unknown family {name!r}")
