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
# # 8. Sampling
#
# This chapter turns the shipped model's logits into tokens: what temperature, top-k, top-p,
# min-p and the repetition penalty do to a real next-token distribution, how the seeded draw
# picks one token, and why the same seed gives the same text in the NumPy and the JAX backends.

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import slimllm
from slimllm.jaxbackend import sampling as jax_sampling
from slimllm.reference.ops import softmax
from slimllm.reference.sampling import (
    SamplingConfig,
    choose,
    min_p_filter,
    process,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
    uniform,
)

slimllm.compile_cache(None)  # compiled programs stay in memory: this notebook writes no files

# %% [markdown]
# ## A real next-token distribution
#
# The model's last layer gives one score, a *logit* $z_i$, per vocabulary entry. The
# distribution it stands for is $p_i = e^{z_i} / \sum_j e^{z_j}$. `generate(...,
# return_logits=True)` returns the raw logits that chose each token; one step on a prompt with
# many plausible continuations gives us a distribution to work with.

# %%
model = slimllm.load(slimllm.SHIPPED_MODEL)
tok = model.tokenizer


def next_logits(prompt: str) -> np.ndarray:
    """The reference's raw logits [v] for the token after `prompt`."""
    out = slimllm.generate(model, prompt, max_new_tokens=1, backend="numpy", return_logits=True)
    return out.logits[0][0]


def label(i: int) -> str:
    """A token as text (quoted, so spaces and newlines show), or its name if it has none."""
    text = tok.decode([int(i)])
    return repr(text) if text else tok.id_to_piece(int(i))


prompt = "This function returns the"
logits = next_logits(prompt)
probs = softmax(logits)
top = np.argsort(-probs)[:10]
entropy = -(probs * np.log(probs + 1e-30)).sum()
print(f"after {prompt!r}: entropy {entropy:.2f} nats ({np.log(len(probs)):.2f} if uniform)")
for i in top:
    print(f"{label(i):16s} {probs[i]:.4f}")

# %% [markdown]
# The processors below follow Hugging Face `generate()` exactly, in its order (the module
# docstring of `reference/sampling.py`): repetition penalty, temperature, top-k, top-p,
# min-p. Each works on a batch of rows of logits ([b, v]) and *excludes* tokens by setting
# their logit to $-\infty$; the softmax of what is left is the distribution the draw uses.
#
# ## Temperature
#
# Dividing the logits by a temperature $T$ before the softmax, $p_i \propto e^{z_i / T}$, keeps
# the order of the tokens and changes how peaked the distribution is: $T < 1$ sharpens it
# (as $T \to 0$ it becomes greedy argmax; slimllm treats $T < 10^{-5}$ as greedy), $T > 1$
# flattens it toward uniform. The figure shows three temperatures: on the left the ten most
# likely tokens (look for the leaders growing at low temperature), on the right every token of
# the vocabulary sorted by probability, on log scales (look for the tail rising and the curve
# flattening at high temperature).

# %%
seen = np.zeros((1, len(logits)), bool)  # no repetition penalty here
temperatures = (0.5, 1.0, 1.5)
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 3.8))
for n, temperature in enumerate(temperatures):
    p = softmax(process(logits[None], SamplingConfig(temperature=temperature), seen))[0]
    left.bar(np.arange(len(top)) + (n - 1) * 0.27, p[top], 0.27, label=f"T = {temperature}")
    right.plot(np.arange(1, len(p) + 1), np.sort(p)[::-1], label=f"T = {temperature}")
left.set_xticks(range(len(top)), [label(i) for i in top], rotation=30)
left.set(ylabel="probability", title=f"The ten likeliest tokens after {prompt!r}")
left.legend()
right.set(xscale="log", yscale="log", xlabel="rank", title="Every token, most likely first")
right.legend()
plt.show()

# %% [markdown]
# ## Cutting the tail: top-k, top-p, min-p
#
# Sampling from the whole distribution now and then picks a very unlikely token, and one bad
# token derails the rest of the text. Three filters cut the tail, each by a different rule:
#
# - **top-k** keeps the $k$ highest logits (and any tied with the $k$-th): a fixed count,
#   however flat or peaked the distribution is.
# - **top-p** (nucleus) sorts the tokens by probability and keeps the smallest top set whose
#   total reaches $p$, the token that crosses $p$ included: few tokens when the model is sure,
#   many when it is not.
# - **min-p** keeps the tokens whose probability is at least $\text{min\_p}$ times the most
#   likely one's: a threshold that scales with the model's confidence.
#
# The figure applies each to the same distribution (the 40 most likely tokens shown, in order
# of probability). Coloured bars are kept, grey ones dropped; the dashed lines are each rule's
# threshold: the $k$-th token, the cumulative probability $p$, and $\text{min\_p} \cdot p_{max}$.

# %%
order = np.argsort(-probs)[:40]
filters = {
    "top-k, k = 10": top_k_filter(logits[None], 10)[0],
    "top-p, p = 0.8": top_p_filter(logits[None], 0.8)[0],
    "min-p, min_p = 0.1": min_p_filter(logits[None], 0.1)[0],
}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
for ax, (name, kept_logits) in zip(axes, filters.items(), strict=True):
    kept = np.isfinite(kept_logits[order])
    ax.bar(range(len(order)), probs[order], color=np.where(kept, "tab:blue", "lightgrey"))
    ax.set(title=f"{name}: {np.isfinite(kept_logits).sum()} kept", xlabel="rank")
axes[0].axvline(10 - 0.5, color="black", ls="--", lw=0.8)
cumulative = axes[1].twinx()
cumulative.plot(np.cumsum(probs[order]), color="tab:red", lw=1)
cumulative.axhline(0.8, color="tab:red", ls="--", lw=0.8)
cumulative.set(ylim=(0, 1), ylabel="cumulative probability")
axes[2].axhline(0.1 * probs.max(), color="black", ls="--", lw=0.8)
axes[0].set_ylabel("probability")
plt.show()

# %% [markdown]
# Change the prompt to one the model is sure about and top-k still keeps 10 tokens, while top-p
# and min-p shrink to one or two: that adaptivity is why they are the usual choice.
#
# ## The repetition penalty
#
# Small models love to repeat themselves. The penalty (HF's rule, from the CTRL paper) lowers
# the score of every token already seen, in the prompt or the output so far: a positive logit
# is divided by the penalty $\rho > 1$, a negative one multiplied by it, so both move down. A
# prompt that invites repetition shows it: after a few imports, the modules already imported
# are natural candidates.

# %%
prompt_imports = "import os\nimport sys\nimport re\nimport"
ids = tok.encode(prompt_imports)
logits_imports = next_logits(prompt_imports)
seen_imports = np.zeros((1, len(logits_imports)), bool)
seen_imports[0, ids] = True
penalised = repetition_penalty(logits_imports[None], seen_imports, 1.5)[0]
before, after = softmax(logits_imports), softmax(penalised)
likeliest = np.argsort(-before)
seen_ranked = [i for i in likeliest if seen_imports[0, i]]  # the seen tokens, likeliest first
shown = sorted({*likeliest[:8], *seen_ranked[:4]}, key=lambda i: -before[i])
fig, ax = plt.subplots(figsize=(10, 3.8))
ax.bar(np.arange(len(shown)) - 0.2, before[shown], 0.4, label="no penalty")
ax.bar(np.arange(len(shown)) + 0.2, after[shown], 0.4, label="penalty 1.5")
ticks = [label(i) + (" (seen)" if seen_imports[0, i] else "") for i in shown]
ax.set_xticks(range(len(shown)), ticks, rotation=30)
ax.set(ylabel="probability", title=f"Next token after {prompt_imports!r}")
ax.legend()
plt.show()

# %% [markdown]
# The figure shows the eight likeliest tokens and the likeliest of those seen in the prompt.
# The tokens marked "(seen)" lose probability, and the unseen ones share what they lost. The
# penalty does not know *why* a token was seen: in this prompt `import`, the newline and even
# `<s>` (the start token the tokenizer adds) are seen too, and the code that follows may need
# them again, which is why the penalty is usually kept small (1.1 to 1.3).
#
# ## The draw: one uniform number, in token-id order
#
# After the processors, one token is drawn. slimllm's draw (`choose`) is inverse-CDF sampling
# in **token-id order**: it walks the vocabulary by id, adding up probabilities, and picks the
# first id at which the running total exceeds $u$ times the total, for one uniform $u \in [0,
# 1)$. Walking by id rather than by probability matters for reproducibility: two backends may
# round a logit differently in the last bit, which can swap two nearly equal tokens in a
# sorted order but never changes their ids.
#
# The uniform number comes from `uniform(seeds, step)`: the Threefry-2x32 block cipher (20
# rounds of 32-bit add, rotate and xor) applied to the counter `step` under the key `seed`.
# It is a pure function of (seed, step): no generator state is carried anywhere, so the
# number is the same whatever ran before, in whichever backend, for a row alone or in a batch.
#
# The left panel shows the running total over token ids after temperature 0.8 and top-k 40
# (it rises only at the 40 kept ids), the line $u$ for seed 7 at step 0, and the token it
# picks. On the right, the same draw made for 4000 different seeds: how often each kept token
# was picked, against its probability. The two should agree up to sampling noise.

# %%
sc = SamplingConfig(temperature=0.8, top_k=40)
scores = process(logits[None], sc, seen)  # [1, v], -inf outside the top 40
u = uniform([7], step=0)  # [1]: seed 7, step 0
picked = choose(scores, u)[0]
p_kept = softmax(scores)[0]

n = 4000
draws = choose(np.repeat(scores, n, axis=0), uniform(np.arange(n), step=0))  # seeds 0..n-1
kept_ids = np.flatnonzero(p_kept > 0)
by_prob = kept_ids[np.argsort(-p_kept[kept_ids])][:15]

fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
left.step(np.arange(len(p_kept)), np.cumsum(p_kept), where="post")
left.axhline(u[0], color="tab:red", ls="--", lw=0.8, label=f"u = {u[0]:.3f} (seed 7, step 0)")
left.axvline(picked, color="tab:green", lw=0.8, label=f"picked id {picked}: {label(picked)}")
left.set(xlabel="token id", ylabel="cumulative probability", title="Inverse CDF in id order")
left.legend(loc="lower right")
counts = np.bincount(draws, minlength=len(logits))[by_prob] / n
right.bar(np.arange(len(by_prob)) - 0.2, p_kept[by_prob], 0.4, label="probability")
right.bar(np.arange(len(by_prob)) + 0.2, counts, 0.4, label=f"frequency in {n} draws")
right.set_xticks(range(len(by_prob)), [label(i) for i in by_prob], rotation=60, fontsize=8)
right.set(title="One draw per seed, seeds 0..3999")
right.legend()
plt.show()

# %% [markdown]
# ## Same seed, same text, in both backends
#
# The JAX backend (`jaxbackend/sampling.py`) has the same processors in `jnp` and the same
# Threefry function on `uint32` arrays. First the random numbers themselves, for a thousand
# seeds at a few steps, compared bit for bit:

# %%
seeds = np.arange(-500, 500) * 7919  # negative seeds too: a seed is any 64-bit integer
for step in (0, 1, 1000):
    from_numpy = uniform(seeds, step)
    from_jax = np.asarray(jax_sampling.uniform(jnp.asarray(jax_sampling.seed_words(seeds)), step))
    print(f"step {step:4d}: identical bits for all {len(seeds)} seeds:", end=" ")
    print(np.array_equal(from_numpy.view(np.uint32), from_jax.view(np.uint32)))

# %% [markdown]
# Then whole generations: the same prompt, seed and settings through the NumPy reference and
# the compiled JAX backend, and once more with another seed.

# %%
settings = dict(max_new_tokens=30, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1)
runs = {
    "numpy, seed 7": slimllm.generate(model, prompt, seed=7, backend="numpy", **settings),
    "jax,   seed 7": slimllm.generate(model, prompt, seed=7, backend="jax", **settings),
    "jax,   seed 8": slimllm.generate(model, prompt, seed=8, backend="jax", **settings),
}
for name, out in runs.items():
    print(f"{name}: {out.text!r}")
print("same ids, numpy and jax, seed 7:", runs["numpy, seed 7"].ids == runs["jax,   seed 7"].ids)

# %% [markdown]
# Identical ids for the same seed, different text for another. Two more consequences of the
# counter-based design, both tested in slimllm: a row of a batch gets the same tokens as when
# run alone (its uniform depends on its own seed and the step only), and under tensor
# parallelism every rank draws the same token from the same candidates without sending it
# (chapter 6). Check the first one with the reference:

# %%
batch = slimllm.generate(model, [prompt, "import"], seed=[7, 3], backend="numpy", **settings)
alone = slimllm.generate(model, prompt, seed=7, backend="numpy", **settings)
print("row 0 of the batch == the prompt alone:", batch.ids[0] == alone.ids[0])

# %% [markdown]
# ## What to try
#
# - Pick a prompt where the model is confident (the middle of a common phrase from the
#   documentation) and redraw the filter figure: which rule keeps how many tokens now?
# - Combine filters: `SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)` and
#   count the survivors after each step of `process`.
# - Generate 100 tokens with and without `repetition_penalty=1.3` and count repeated lines.
# - Set `temperature=1e-6`: slimllm treats it as greedy in both backends. Why would the two
#   backends otherwise draw different tokens at such a temperature? (The module docstring of
#   `reference/sampling.py` answers.)
