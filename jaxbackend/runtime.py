"""Run settings in JAX: the reference's `Runtime` (the same value, static under jit) and the
attention kinds of this backend, under the same names as the reference's table."""

from __future__ import annotations

from slimllm.reference.runtime import Runtime
from slimllm.reference.runtime import attention_fn as lookup

from .attention import naive_attention
from .flash_attention import flash_attention
from .slim_attention import slim_attention

__all__ = ["ATTENTION", "Runtime", "attention_fn"]

ATTENTION = {"naive": naive_attention, "slim": slim_attention, "flash": flash_attention}


def attention_fn(rt: Runtime):
    """The JAX attention function of `rt` (with its options)."""
    return lookup(rt, ATTENTION)
