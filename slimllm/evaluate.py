"""Accuracy harness: how far a setting (cache dtype, weight format, attention kind, backend)
drifts from the float32 naive NumPy reference on the same model and tokens; and the memory a
setting needs, from a model's config alone.

For a token sequence it reports, per position, the KL divergence KL(baseline || setting) of the
next-token distributions (mean, p99, max), top-1 agreement, the perplexity of the sequence
under both, and over N greedy tokens from the sequence's prompt the length of the identical
prefix — the figures llama.cpp's perplexity/KL tool gives its users, for any family.
Logits are teacher-forced: the prompt is prefilled as generation would, the rest of the sequence
in chunks (equal to token-by-token decode, since attention always reads the cache back).
A weight format is part of the setting: the baseline runs the loaded weights in float32 (widened
exactly when the checkpoint stores a narrower float), the setting encodes them once in its format
(`Model.params_for`).
Non-finite logits are never agreement: a baseline that gives NaN/inf anywhere is an error (there
is nothing to measure against), and a setting's NaN/inf positions count as disagreeing, with an
infinite KL (null in --json) and their number in `nonfinite_positions`.

The memory report counts bytes exactly as they would be stored: every matrix of
`params.model_shapes`/`layer_shapes` in its format's encoding (`tables` for the embedding, head
and width projections, `matrices` for the rest, scales included), vectors in float32, and the KV
cache of `kv_cache.nbytes_per_token`; no activations or runtime overhead.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from slimllm.reference import kv_cache, positions
from slimllm.reference.errors import SlimllmError
from slimllm.reference.generate import check_prompts, token_ids
from slimllm.reference.model import forward
from slimllm.reference.ops import log_softmax
from slimllm.reference.params import layer_shapes, model_shapes
from slimllm.reference.runtime import Runtime
from slimllm.reference.weight_format import WEIGHT_FORMATS, stored_bytes, weight_format

from .api import Model, generate
from .progress import bar

BASELINE = Runtime(backend="numpy", weights="float32")  # the float32 naive NumPy reference


class NonFiniteLogits(SlimllmError):
    """The baseline's logits hold NaN or inf: there is no reference to measure a setting by."""


def chunk_bounds(n: int, prompt_len: int, chunk: int) -> list[int]:
    """Where each forward chunk ends: the prompt, then `chunk` tokens at a time."""
    return sorted({prompt_len, *range(prompt_len + chunk, n, chunk), n})


def sequence_logits(model: Model, tokens, prompt_len: int, setting: Runtime, chunk: int = 128):
    """Logits [n, v] at every position of `tokens` under `setting` (prompt prefilled first)."""
    cfg = model.cfg
    tokens = [int(t) for t in tokens]
    bounds = chunk_bounds(len(tokens), prompt_len, chunk)
    if setting.backend == "jax":
        from slimllm.jaxbackend import sequence  # jax: once the device count for tp is set

        return sequence.sequence_logits(model.engine(setting), tokens, bounds, setting)
    state = positions.start_state(cfg, [tokens[:prompt_len]])
    cache = kv_cache.init_cache(cfg, 1, len(tokens), setting.kv_dtype)
    params = model.params_for(setting)
    out, start = [], 0
    for end in bounds:
        chunk = np.array([tokens[start:end]])  # [1,t]
        logits, cache = forward(params, cfg, chunk, cache, state, setting)
        out.append(logits[0])
        state, start = positions.advance(state, end - start), end
    return np.concatenate(out)


def sample_sequence(model: Model, prompt: list[int], length: int, seed: int) -> list[int]:
    """A sequence drawn from the model itself (float32 reference, temperature 1): realistic
    text for models without a tokenizer or data set."""
    n = length - len(prompt)
    if n <= 0:
        return list(prompt[:length])
    out = generate(
        model, ids=prompt, max_new_tokens=n, temperature=1.0, seed=seed, eos_ids=(), backend="numpy"
    )
    return list(prompt) + out.ids[0]


def compare(
    model: Model,
    tokens,
    prompt_len: int,
    setting: Runtime,
    baseline: Runtime = BASELINE,
    greedy_tokens: int = 200,
) -> dict:
    """All harness figures for `setting` against `baseline` on one sequence, its first
    `prompt_len` tokens prefilled as a prompt: `kl` (KL(baseline || setting) of the next-token
    distributions over the positions: mean, p99, max), `top1_agreement`, `perplexity` (of the
    sequence under each), `greedy` (`greedy_tokens` greedy ids from the prompt under each: the
    length of their identical prefix, the fraction that agree) and `nonfinite_positions`."""
    tokens = token_ids(tokens, "tokens")
    check_prompts(model.cfg, [tokens], 0, None)  # ids inside the vocabulary and the context
    steps = iter(bar(range(4), f"eval {setting.describe()}"))
    next(steps)
    base = sequence_logits(model, tokens, prompt_len, baseline).astype(np.float64)
    broken = ~np.isfinite(base).all(axis=-1)  # [n]
    if broken.any():
        raise NonFiniteLogits(
            f"the baseline ({baseline.describe()}) gives non-finite logits at "
            f"{int(broken.sum())} of {len(broken)} positions (first: {int(np.argmax(broken))}): "
            "the model's weights hold NaN/inf or its activations overflow; nothing to compare"
        )
    base = log_softmax(base)
    next(steps)
    test = sequence_logits(model, tokens, prompt_len, setting).astype(np.float64)
    nonfinite = ~np.isfinite(test).all(axis=-1)  # [n] positions the setting got wrong outright
    test = log_softmax(test)
    kl = np.sum(np.exp(base) * (base - test), axis=-1)  # [n]
    kl[nonfinite] = np.inf
    targets = np.asarray(tokens[1:])
    rows = np.arange(len(targets))

    def perplexity(logp):
        return float(np.exp(-logp[rows, targets].mean()))

    prompt = list(tokens[:prompt_len])
    greedy_tokens = min(greedy_tokens, model.cfg.max_len - prompt_len)
    runs = []
    for s in (baseline, setting):
        next(steps, None)
        runs.append(
            generate(
                model,
                ids=prompt,
                max_new_tokens=greedy_tokens,
                eos_ids=(),
                runtime=s,
            ).ids[0]
        )
    for _ in steps:  # finish the bar
        pass
    same = next((i for i, (a, b) in enumerate(zip(*runs, strict=True)) if a != b), greedy_tokens)
    return {
        "positions": len(tokens),
        "prompt_len": prompt_len,
        "baseline": asdict(baseline),
        "setting": asdict(setting),
        "kl": {
            "mean": float(kl.mean()),
            "p99": float(np.quantile(kl, 0.99)),
            "max": float(kl.max()),
        },
        "top1_agreement": float(((base.argmax(-1) == test.argmax(-1)) & ~nonfinite).mean()),
        "nonfinite_positions": int(nonfinite.sum()),
        "perplexity": {"baseline": perplexity(base), "setting": perplexity(test)},
        "greedy": {
            "tokens": greedy_tokens,
            "identical_prefix": same,
            "agreement": float(np.mean(np.equal(*runs))),
        },
    }


def weight_bytes_for(cfg, fmt, group: int | None = None) -> int:
    """Bytes of all of a config's weights in format `fmt` (what `weight_bytes` of the encoded
    params gives, without making them)."""
    layer = sum(stored_bytes(n, s, fmt, group) for n, s in layer_shapes(cfg).items())
    top = sum(stored_bytes(n, s, fmt, group) for n, s in model_shapes(cfg).items())
    return cfg.n_layers * layer + top


def kv_rows(cfg, context: int, batch: int) -> dict:
    """Cache bytes per token and for `batch` sequences of `context` tokens, per storage dtype."""
    rows = {}
    for dtype in kv_cache.KV_DTYPES:
        per_token = kv_cache.nbytes_per_token(cfg, dtype)
        rows[dtype] = {"bytes_per_token": per_token, "total_bytes": per_token * context * batch}
    f32 = rows["float32"]["total_bytes"]
    for row in rows.values():
        row["vs_float32"] = row["total_bytes"] / f32
    return rows


def memory_report(
    cfg,
    context: int,
    batch: int,
    weights: str = "float32",
    group: int | None = None,
    memory_gib: float | None = None,
) -> dict:
    """Weights in format `weights` plus the KV cache of each format for `batch` x `context`
    tokens: bytes, and the smallest whole number of GiB that holds them (or whether they fit in
    `memory_gib`). `weight_formats` compares every format; a format whose group does not divide
    the model's widths is listed with its reason instead of bytes."""
    chosen = weight_bytes_for(cfg, weight_format(weights), group)
    formats = {}
    for name, fmt in WEIGHT_FORMATS.items():
        try:
            formats[name] = {"bytes": weight_bytes_for(cfg, fmt, group)}
        except ValueError as err:
            formats[name] = {"bytes": None, "error": str(err)}
    dtypes = kv_rows(cfg, context, batch)
    totals = {}
    for dtype, row in dtypes.items():
        total = chosen + row["total_bytes"]
        totals[dtype] = {"bytes": total, "fits_gib": math.ceil(total / 2**30)}
        if memory_gib is not None:
            totals[dtype]["fits"] = total <= memory_gib * 2**30
    return {
        "context": context,
        "batch": batch,
        "layers": cfg.n_layers,
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "dtypes": dtypes,  # the KV cache per format (the report's original keys)
        "parameters": cfg.n_params(),
        "weights": {"format": weights, "group": group, "bytes": chosen},
        "weight_formats": formats,
        "totals": totals,  # weights in `weights` + the KV cache of each format
        "memory_gib": memory_gib,
    }


def size(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def format_memory(report: dict) -> str:
    """The readable memory report: weights per format, KV cache per dtype, and the totals."""
    weights, memory = report["weights"], report["memory_gib"]
    lines = [
        f"{report['parameters']:,d} parameters; batch {report['batch']} x context "
        f"{report['context']} ({report['layers']} layers, {report['kv_heads']} kv heads, "
        f"d={report['head_dim']})",
        f"weights (group: {weights['group'] or 'the format default'})",
    ]
    for name, row in report["weight_formats"].items():
        mark = "  <- in the totals" if name == weights["format"] else ""
        lines.append(
            f"  {name:9s} {size(row['bytes']) if row['bytes'] else row['error']:>14s}{mark}"
        )
    lines.append("KV cache")
    for dtype, row in report["dtypes"].items():
        lines.append(
            f"  {dtype:9s} {row['bytes_per_token']:>10,d} B/token  "
            f"{size(row['total_bytes']):>14s}  ({row['vs_float32']:.3f}x float32)"
        )
    lines.append(f"total with {weights['format']} weights")
    for dtype, row in report["totals"].items():
        if memory is None:
            verdict = f"fits in {row['fits_gib']} GiB"
        else:
            verdict = f"{'fits' if row['fits'] else 'does not fit'} in {memory:g} GiB"
        lines.append(f"  + {dtype:9s} KV {size(row['bytes']):>14s}  {verdict}")
    return "\n".join(lines)
