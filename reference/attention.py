"""Naive attention: the definition every faster attention in slimllm is tested against.

Scores are materialised in full: `softmax(q k^T * scale + bias) v` per (batch, query head), with
grouped-query attention by reshaping the h query heads into k groups of g. The additive bias
holds the mask (causal on cache slots, plus the prefix-LM rule) and ALiBi. Keys are the whole
preallocated cache; slots not yet written are masked because they are in the future of every
query (slot > query slot).
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .ops import softmax
from .positions import Positions, alibi_slopes


def visible(pos: Positions, s: int):
    """Mask [b,t,s]: key slot j is visible to the query at slot i if j <= i or j < prefix."""
    j = np.arange(s)[None, None, :]
    return (j <= pos.slots[:, :, None]) | (j < pos.prefix[:, None, None])


def attention_bias(cfg: ModelConfig, pos: Positions, s: int):
    """Additive bias [b,h|1,t,s]: 0 or -inf from the mask, plus ALiBi slope * (j - i)."""
    mask = visible(pos, s)[:, None]  # [b,1,t,s]
    bias = np.where(mask, np.float32(0.0), np.float32(-np.inf))
    if cfg.pos == "alibi":
        rel = np.arange(s)[None, None, :] - pos.slots[:, :, None]  # [b,t,s]
        slopes = alibi_slopes(cfg.n_heads)[None, :, None, None]  # [1,h,1,1]
        bias = bias + slopes * rel[:, None].astype(np.float32)  # [b,h,t,s]
    return bias.astype(np.float32)


def split_heads(bias, k: int):
    """[b,h|1,t,s] -> [b,k|1,g|1,t,s] so it broadcasts against grouped scores."""
    b, h, t, s = bias.shape
    return bias.reshape(b, k, h // k, t, s) if h > 1 else bias[:, :, None]


def naive_attention(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v; q [b,t,h,d], k/v [b,k,s,d] -> [b,t,h,d]."""
    b, t, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, t, kh, h // kh, d)  # [b,t,h,d] -> [b,t,k,g,d]
    scores = np.einsum("btkgd,bksd->bkgts", qg, k, optimize=True) * np.float32(scale)  # [b,k,g,t,s]
    probs = softmax(scores + split_heads(bias, kh), axis=-1)
    out = np.einsum("bkgts,bksd->btkgd", probs, v, optimize=True)  # [b,k,g,t,s] -> [b,t,k,g,d]
    return out.reshape(b, t, h, d).astype(np.float32)
