"""Load-time transforms: the maths that turns stored checkpoint tensors into slimllm parameters.

Family files name these in their declarations and `weights.convert` applies them once, at load:
a fused splitter (`split_rows`, `split_per_head`) receives a checkpoint tensor in torch's
`[out, in]` layout and returns canonical parameters; a transform (`norm_head`) receives one
canonical parameter in slimllm's `[in, out]` layout. Nothing here runs during inference, so the
compute code (reference/, jaxbackend/) has no twin of these.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slimllm.reference.config import ModelConfig

from .io import CheckpointError


def check_rows(w, sizes: dict[str, int]):
    """A fused tensor has the rows its parts need (a wrong rank or size is a CheckpointError,
    named by the family's `Family.fused` wrapper; the parts' columns are checked later)."""
    rows = w.shape[0] if w.ndim else None
    if rows != sum(sizes.values()) or w.ndim > 2:
        raise CheckpointError(
            f"fused tensor of shape {tuple(w.shape)}, expected {sum(sizes.values())} rows "
            f"({' + '.join(f'{n}={s}' for n, s in sizes.items())}) and at most 2 dims"
        )


def split_rows(sizes_of: Callable[[ModelConfig], dict[str, int]]):
    """A fused-tensor splitter: consecutive blocks of output rows, e.g. [q | k | v]."""

    def split(w, cfg):
        sizes = sizes_of(cfg)
        check_rows(w, sizes)
        bounds = np.cumsum([0, *sizes.values()])
        return {n: w[a:b] for n, a, b in zip(sizes, bounds[:-1], bounds[1:], strict=True)}

    return split


def qkv_sizes(names: tuple[str, str, str]):
    """Row sizes of a fused [q | k | v] projection for the canonical names given."""

    def sizes(cfg):
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return dict(zip(names, (q, kv, kv), strict=True))

    return sizes


def gate_up_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Row sizes of a fused [gate | up] projection."""
    return {"layers.{i}.w_gate": cfg.ffn_width, "layers.{i}.w_up": cfg.ffn_width}


def split_per_head(prefix: str):
    """A fused-tensor splitter for rows grouped per head [q_h | k_h | v_h] -> wq, wk, wv (or the
    biases, for prefix "b"), each with its heads in order."""

    def split(w, cfg):
        check_rows(
            w, {f"{cfg.n_heads} heads * [q|k|v] * {cfg.head_dim}": cfg.n_heads * 3 * cfg.head_dim}
        )
        grouped = w.reshape(
            cfg.n_heads, 3, cfg.head_dim, *w.shape[1:]
        )  # [h*3*d, ...] -> [h,3,d,...]
        return {
            f"layers.{{i}}.{prefix}{n}": grouped[:, j].reshape(
                cfg.n_heads * cfg.head_dim, *w.shape[1:]
            )
            for j, n in enumerate("qkv")
        }

    return split


def l2_normalize_rows(w, eps=1e-12):
    """w / max(||w||_2, eps) per row (the norm summed in float64)."""
    norm = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=-1, keepdims=True))
    return (w / np.maximum(norm, eps)).astype(w.dtype)


def norm_head(w, cfg: ModelConfig):
    """NormHead (Baichuan 2): each vocabulary row of the LM head has unit L2 norm.

    Upstream normalises at its first eval forward, so checkpoints store the rows un-normalised.
    Our lm_head is [e, v]: the rows of the hub's [v, e] layout are our columns.
    """
    return l2_normalize_rows(w.T).T.copy()


def hf_rope_permute(w, cfg: ModelConfig, n_heads: int):
    """Reorder the output columns of a q/k weight [e, n*d] from interleaved pairs to rotate-half.

    This is the permutation Hugging Face's Llama conversion applies to Meta/llama2.c weights,
    so that rotate-half RoPE on the result equals interleaved RoPE on the original.
    """
    e = w.shape[0]
    d = cfg.head_dim
    w = w.reshape(e, n_heads, d // 2, 2)  # column (head, pair j, member)
    return np.ascontiguousarray(w.transpose(0, 1, 3, 2).reshape(e, n_heads * d))
