# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. Using the oracle
#
# This chapter plants two bugs in copies of the shipped model's layers, the kind that make
# generated text slightly worse without any error, and finds each one with `slimllm diff`:
# save your implementation's intermediate values, let the NumPy reference compute the same
# ones, and read where they first part.

# %%
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import matplotlib.pyplot as plt
import numpy as np

import slimllm
from slimllm.diff import Side, diff, format_report, load_dump, parse_side, trace
from slimllm.reference import kv_cache, positions
from slimllm.reference.model import TRACE_KEYS, forward, tracing
from slimllm.reference.ops import NORMS
from slimllm.reference.positions import ROTATIONS, rope_angles
from slimllm.train import held_out_documents

# %% [markdown]
# ## What `slimllm diff` compares
#
# Both sides run the same model on the same tokens and record the same named intermediates,
# in computation order (`reference.model.TRACE_KEYS`):

# %%
for key in TRACE_KEYS:
    print(key)

# %% [markdown]
# A side is a setting of slimllm (`numpy`, `jax:slim:int8:tp2`, ...), the upstream
# `transformers` model (`hf`), or a **dump**: an `.npz` file with the `tokens` it was computed
# on and any of these names, written by *your* implementation. For every name both sides have,
# the report gives the largest absolute error, the relative error (largest absolute error
# divided by the largest magnitude on side a) and, if that exceeds the tolerance, the first
# token position where it does. The first row over the tolerance, in computation order, is
# where to look: everything before it agrees.
#
# First, two sides that should agree: the NumPy reference and the JAX backend (compiled by
# XLA, with slimllm's C++ kernels where they are built), on 64 tokens of a held-out document.

# %%
slimllm.compile_cache(None)  # the JAX side's compiled program stays in memory: no files
model = slimllm.load(slimllm.SHIPPED_MODEL)
cfg = model.cfg
tokens = model.tokenizer.encode(held_out_documents(slimllm.SHIPPED_MODEL)[1])[:64]
report = diff(model, tokens, len(tokens), parse_side("numpy"), parse_side("jax"))
print(format_report(report))

# %% [markdown]
# Every relative error is float32 rounding: the two backends add the same products in
# different orders. The default tolerance, `1e-4`, is far above that and far below what a real
# mistake produces.
#
# ## Two bugs, in copies
#
# The reference looks each layer kind up once, in a dispatch table: `ops.NORMS["rms"]` for the
# RMSNorm, `positions.ROTATIONS["rope"]` for RoPE. That makes "your implementation" easy to
# build for this experiment: copy a function, change it, and lend the copy to the model with
# `mock.patch.dict` for one forward. The library's files are never edited, and the tables are
# restored when the `with` block ends.
#
# **Bug 1, a wrong epsilon.** RMSNorm computes $x / \sqrt{\overline{x^2} + \epsilon} \cdot w$.
# This model's config says $\epsilon = 10^{-5}$; our copy hard-codes $10^{-6}$, the quirk the
# paper's code has in some of its norms.
#
# **Bug 2, the halves of RoPE swapped.** "Rotate half" pairs dimension $j$ with $j + d/2$ and
# rotates each pair by the angle $p\,\theta_j$ of its position $p$:
# $(x_1, x_2) \mapsto (x_1 \cos - x_2 \sin,\; x_2 \cos + x_1 \sin)$. Our copy swaps the roles
# of the halves, $(x_1 \cos + x_2 \sin,\; x_2 \cos - x_1 \sin)$: a rotation by $-p\,\theta_j$.
# It looks just as plausible, and it is a rotation too, so every vector keeps its length.


# %%
def rms_norm_wrong_eps(x, w, bias, eps):
    """RMSNorm with the epsilon hard-coded (the planted bug: `eps` is ignored)."""
    x32 = x.astype(np.float32)
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(1e-6))
    return x32 * inv * w


def rope_swapped_halves(x, cfg, pos):
    """Rotate-half RoPE with the halves' roles swapped (the planted bug: rotates by -angle)."""
    cos, sin = rope_angles(cfg, pos.ids, pos.ntk_alpha)  # [b,t,d/2] each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # -> [b,t,1,d/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [b,t,n,d] -> 2 x [b,t,n,d/2]
    return np.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


BUGS = {
    "wrong RMSNorm epsilon": (NORMS, {"rms": rms_norm_wrong_eps}),
    "RoPE halves swapped": (ROTATIONS, {"rope": rope_swapped_halves}),
}
workdir = Path(tempfile.mkdtemp())  # the dumps are the only files this notebook writes


def dump_with_bug(bug: str) -> Path:
    """One forward of the reference with the buggy copy in its table; save every intermediate."""
    table, copy = BUGS[bug]
    state = positions.start_state(cfg, [tokens])
    cache = kv_cache.init_cache(cfg, 1, len(tokens))
    with mock.patch.dict(table, copy), tracing() as trace_b:
        forward(model.params, cfg, np.asarray([tokens]), cache, state)
    path = workdir / f"{bug.replace(' ', '_')}.npz"
    np.savez(path, tokens=np.asarray(tokens), **trace_b)  # names as slimllm diff expects
    return path


dumps = {bug: dump_with_bug(bug) for bug in BUGS}
for path in dumps.values():
    with np.load(path) as npz:
        print(f"{path.name}: {len(npz.files)} arrays, e.g. layers.0.q {npz['layers.0.q'].shape}")

# %% [markdown]
# ## Finding bug 1 from the command line
#
# `slimllm diff --model DIR --dump FILE.npz` compares the dump (side b) with the NumPy reference
# (side a, the default) on the dump's own tokens. One choice first: the tolerance. Here "your
# implementation" is the reference with one function swapped, so everything the bug does not
# touch agrees bit for bit, and we can ask for a tolerance far tighter than the default:
# `--tol 1e-6`. (An independent implementation, in JAX or in `transformers`, adds its products
# in another order and needs the default `1e-4`; why that matters for this bug is below.)

# %%
command = [sys.executable, "-m", "slimllm.cli", "diff", "--model", str(slimllm.SHIPPED_MODEL)]
dump = dumps["wrong RMSNorm epsilon"]
done = subprocess.run(
    [*command, "--dump", str(dump), "--tol", "1e-6"], capture_output=True, text=True
)
print(done.stdout or done.stderr)

# %% [markdown]
# How to read it. `embed` agrees: the bug is after the embeddings. The row marked "first" is
# `layers.0.attn_in`, the input of the first attention, which is the output of the first
# RMSNorm: that is where to look. Every row after it differs too, because every later value
# depends on that one, so only the *first* row locates the bug. Its first position is 0: a norm
# works on each token alone, so it is wrong at every position at once.
#
# How large is the bug, and would the default tolerance have seen it? Changing $\epsilon$ by
# $\Delta\epsilon$ changes a normalised vector $x$ by a relative
# $\approx \tfrac12 \Delta\epsilon / \overline{x^2}$: large where the vectors are small (the
# embeddings of a trained model usually are), vanishing in the residual stream of deeper layers,
# whose vectors are larger. The prediction from the embeddings, beside the report's `rel` (they
# agree in order of magnitude: the report divides by the largest value of the whole array, the
# prediction by each vector's own size):

# %%
reference_trace = trace(model, tokens, len(tokens), Side())  # side a: the NumPy reference
mean_square = (reference_trace["embed"].astype(np.float64) ** 2).mean(axis=-1)  # per token
predicted = 0.5 * (1e-5 - 1e-6) / mean_square
side_b = parse_side(f"dump:{dump}")
report_eps = diff(model, None, len(tokens), Side(), side_b, tol=1e-6)  # tokens: the dump's
measured = {row["key"]: row["rel"] for row in report_eps["rows"]}
print(f"predicted relative change of layers.0.attn_in: up to {predicted.max():.2e}")
print(f"measured (the report's rel):                  {measured['layers.0.attn_in']:.2e}")
print(f"over the default tolerance 1e-4: {measured['layers.0.attn_in'] > 1e-4}")

# %% [markdown]
# If the last line says `False`, this bug would hide under the default tolerance when you
# compare an independent implementation: a reason to look at the `rel` column, not only at the
# "first" mark, and to tighten `--tol` where the arithmetic allows it.
#
# ## Finding bug 2 with the Python function
#
# The same report, as data: `slimllm.diff.diff(model, tokens, prompt_len, side_a, side_b,
# tol)` returns the dict that `--json` prints (schema `slimllm.diff/1`, documented in
# `slimllm/diff.py`). With the dump as side b, the tokens come from the dump; the tolerance is
# the tight one again.

# %%
side_b = parse_side(f"dump:{dumps['RoPE halves swapped']}")
report_rope = diff(model, None, len(tokens), Side(), side_b, tol=1e-6)
print(format_report(report_rope))
print(json.dumps(report_rope["first"], indent=1))

# %% [markdown]
# Now the first row over the tolerance is `layers.0.q`, the queries after positions: the bug is
# between the projection and the cache, in RoPE. (The keys are rotated by the same function
# and differ too; `q` comes first only because it is recorded first.) And the first
# position is **1, not 0**: at position 0 every angle is $0 \cdot \theta_j = 0$, a rotation
# by $+0$ or $-0$ is the identity, so the first token is exactly right. A bug that spares
# position 0 points at the position encoding; a bug that hits position 0 lies elsewhere.
#
# The figure shows both reports at once, then the error of each bug's first wrong
# intermediate position by position. On the left, look for the step from exact agreement
# (drawn at the bottom of the scale) to disagreement at the row the report marked first, and how
# each error then carries through every later layer up to the logits. On the right, the norm
# bug is about the same size at every position, while the RoPE bug is exactly zero at position
# 0 and large from position 1 on.

# %%
reports = {"wrong RMSNorm epsilon": report_eps, "RoPE halves swapped": report_rope}
floor = 1e-12  # exact agreement (relative error 0), drawn at the bottom of the log scale
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(2, 1))
for bug, rep in reports.items():
    keys = [row["key"] for row in rep["rows"]]
    left.plot([max(row["rel"], floor) for row in rep["rows"]], marker=".", label=bug)
    first = rep["first"]["key"]
    values_a = reference_trace[first].reshape(len(tokens), -1)  # [t, ...] -> [t, n]
    values_b = load_dump(dumps[bug])[1][first].reshape(len(tokens), -1)
    per_position = np.abs(values_b - values_a).max(axis=1) / np.abs(values_a).max()
    right.plot(np.maximum(per_position, floor), marker=".", label=f"{bug}: {first}")
left.axhline(report_rope["tolerance"], color="black", lw=0.8, ls="--", label="tolerance")
left.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
left.set(yscale="log", ylabel="relative error", title="Each intermediate, computation order")
left.legend(fontsize=8)
right.set(yscale="log", xlabel="token position", title="First wrong intermediate, per position")
right.legend(fontsize=8)
plt.show()

# %% [markdown]
# Does the norm bug matter? The report's last row is the logits. A useful second look is
# whether the buggy model would still *choose* the same tokens:

# %%
for bug, path in dumps.items():
    logits_b = load_dump(path)[1]["logits"]  # [t, v]
    same = np.mean(logits_b.argmax(-1) == reference_trace["logits"].argmax(-1))
    print(f"{bug:22s} same top-1 token at {same:.0%} of the positions")

# %% [markdown]
# A small epsilon error may leave every greedy choice intact on these tokens and still shift
# the probabilities a little; a RoPE error scrambles how far apart tokens are and usually
# changes choices at once. Either way, the oracle found the layer, the intermediate and the
# first position without our reading a line of the buggy code.
#
# ## What to try
#
# - Plant your own bug (a missing $1/\sqrt d$ in attention, a transposed weight, SiLU swapped
#   for GELU in the MLP table `ops.MLPS`) and predict the first row and position before
#   running the diff.
# - Use interleaved pairs instead of halves (`cfg.replace(rope_style="interleaved")`, the
#   classic mismatch between Meta's and Hugging Face's Llama layouts) and read the report.
# - Compare real settings instead of a dump: `--b numpy:int8` (the INT8 KV cache: where does it
#   first exceed the tolerance, and by how much at the logits?) or `--b jax:slim:tp2`.
# - With `pip install '.[oracle]'`, `--against hf` runs the transformers implementation of the
#   same checkpoint as side b.
