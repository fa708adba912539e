"""Choosing the next token in JAX: the reference's `sampling.py` in jnp.

The same processors in the same order (HF semantics) and the same counter-based Threefry-2x32
uniforms from (seed, step), computed with uint32 jnp operations, so a seed gives the same
tokens in both backends.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from slimllm.reference.sampling import ROTATIONS, SamplingConfig

from .ops import softmax

__all__ = ["SamplingConfig", "sample", "uniform", "process", "choose"]

PARITY = np.uint32(0x1BD11BDA)


def rotl(x, r):
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def threefry2x32(key0, key1, x0, x1):
    """Threefry-2x32, 20 rounds: the reference's function on uint32 jnp arrays."""
    ks = (key0, key1, key0 ^ key1 ^ jnp.uint32(PARITY))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for r in ROTATIONS[(block % 2) * 4 : (block % 2) * 4 + 4]:
            x0 = x0 + x1
            x1 = rotl(x1, r) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + jnp.uint32(block + 1)
    return x0, x1


def uniform(seeds, step):
    """One float32 in [0, 1) per row from (seed lo/hi words [b, 2] uint32, step)."""
    key0, key1 = seeds[:, 0], seeds[:, 1]
    counter = jnp.full(key0.shape, step, jnp.uint32)
    x0, _ = threefry2x32(key0, key1, counter, jnp.zeros_like(key0))
    return (x0 >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)


def seed_words(seeds) -> np.ndarray:
    """Host seeds (int64) -> [b, 2] uint32 key words, as the reference splits them."""
    seeds = np.asarray(seeds, np.int64)
    return np.stack([seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF], -1).astype(np.uint32)


def repetition_penalty(logits, seen, penalty: float):
    if penalty == 1.0:
        return logits
    p = jnp.float32(penalty)
    return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def top_k_filter(logits, top_k: int):
    """Keep scores >= the top_k-th largest of each row (ties kept), -inf elsewhere."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = -jnp.sort(-logits, axis=-1)[:, top_k - 1 : top_k]  # [b,v] -> [b,1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
    if p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1, stable=True)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)  # [b,v], ascending per row
    cum = jnp.cumsum(softmax(sorted_logits, axis=-1), axis=-1)  # [b,v]
    drop_sorted = (cum <= jnp.float32(1.0 - p)).at[:, -1].set(False)
    drop = (
        jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    )
    return jnp.where(drop, -jnp.inf, logits)


def min_p_filter(logits, min_p: float):
    if min_p <= 0.0:
        return logits
    probs = softmax(logits, axis=-1)
    threshold = jnp.float32(min_p) * probs.max(axis=-1, keepdims=True)  # [b,v] -> [b,1]
    return jnp.where(probs < threshold, -jnp.inf, logits)


def process(logits, sc: SamplingConfig, seen, penalty: bool = True):
    """All processors in HF order (penalty=False: already applied, e.g. before a top-k gather)."""
    if penalty:
        logits = repetition_penalty(logits.astype(jnp.float32), seen, sc.repetition_penalty)
    if sc.greedy:
        return logits
    logits = logits / jnp.float32(sc.temperature)
    logits = top_k_filter(logits, sc.top_k)
    logits = top_p_filter(logits, sc.top_p)
    return min_p_filter(logits, sc.min_p)


def choose(scores, u):
    """Inverse-CDF draw in token-id order (see the reference)."""
    probs = softmax(scores, axis=-1)  # [b,v]
    cum = jnp.cumsum(probs, axis=-1)  # [b,v]
    idx = jnp.sum(cum <= u[:, None] * cum[:, -1:], axis=-1)  # [b,v] <= [b,1] -> [b]
    last = scores.shape[-1] - 1 - jnp.argmax((probs > 0)[:, ::-1], axis=-1)  # [b,v] -> [b]
    return jnp.minimum(idx, last)


def sample(logits, sc: SamplingConfig, seen, seeds, step):
    """Next token per row [b] from raw logits [b,v] (seeds: [b, 2] uint32 words)."""
    scores = process(logits, sc, seen)
    if sc.greedy:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [b,v] -> [b]
    return choose(scores, uniform(seeds, step)).astype(jnp.int32)
