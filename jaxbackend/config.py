"""The model config is shared with the reference: one frozen, hashable dataclass, used here as
a static jit argument."""

from slimllm.reference.config import ModelConfig

__all__ = ["ModelConfig"]
