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
# # 5. SlimAttention versus flash attention
#
# This chapter compares the two ways slimllm computes attention faster than the textbook
# formula: SlimAttention, the paper's one-dimensional blocking, and a FlashAttention-style
# baseline with two-dimensional tiles. We draw which query rows and key slots each one computes
# at a time, count the work each does by recording the calls it makes, and time both on this
# machine.

# %%
import contextlib
from unittest import mock

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import slimllm
import slimllm.reference.flash_attention as flash_module
import slimllm.reference.key_blocks as key_blocks
from slimllm import kernels
from slimllm.bench.attention import causal_bias, compiled_attention, layer_kv
from slimllm.bench.common import interleaved
from slimllm.reference import kv_cache, positions
from slimllm.reference.attention import attention_bias, naive_attention
from slimllm.reference.config import ModelConfig
from slimllm.reference.flash_attention import flash_attention
from slimllm.reference.model import forward, tracing
from slimllm.reference.positions import Positions
from slimllm.reference.slim_attention import L2_BUDGET, block_rows, slim_attention
from slimllm.train import held_out_documents

# %% [markdown]
# ## Three ways to compute the same numbers
#
# For one (batch, head) with queries $Q$ ($T \times d$), keys $K$ and values $V$
# ($S \times d$) and a mask $M$ (0 where a key is visible, $-\infty$ where it is not), attention
# is
#
# $$O = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt d} + M\right) V .$$
#
# **Naive attention** (`reference/attention.py`) builds the whole $T \times S$ score matrix,
# then takes an exact softmax of each row. It is the definition every other kind is tested
# against, but its score matrix grows with $T \cdot S$.
#
# **SlimAttention** (`reference/slim_attention.py`) cuts the score matrix only along the query
# rows, into blocks of $m_b$ rows. Each block computes its *complete* score rows against every
# key it can see, an exact softmax per row (max, exp, sum, divide), and then $P V$. Nothing is
# carried from one block to the next, so each block's output is final when written. The price
# is a buffer of $m_b \times S$ scores per worker, which xFT sizes to fit a CPU's L2 cache.
#
# **Flash attention** (`reference/flash_attention.py`) cuts both ways, into tiles of
# $q_t \times k_t$. A tile of query rows visits the key tiles in order while it keeps, per row,
# a running maximum $m$, a running sum $\ell$ and an unnormalised output $a$. When key tile $j$
# brings scores $S_j$:
#
# $$m' = \max(m, \operatorname{rowmax} S_j), \quad P_j = e^{S_j - m'}, \quad
# \ell \leftarrow e^{m - m'}\,\ell + \operatorname{rowsum} P_j, \quad
# a \leftarrow e^{m - m'}\,a + P_j V_j ,$$
#
# and the output is $a / \ell$ after the last tile. Its score buffer is tiny, but every key tile
# rescales the output accumulator, and the keys and values are read once for every query tile.
#
# Both are exact: they compute the same numbers as naive attention, up to float rounding.
# Here they are on real queries, keys and values: those of the shipped model's first layer on
# a held-out document, as many tokens as its context holds (the mask is the causal one the
# model builds, $-\infty$ above the diagonal).

# %%
model = slimllm.load(slimllm.SHIPPED_MODEL)
cfg = model.cfg
tokens = model.tokenizer.encode(held_out_documents(slimllm.SHIPPED_MODEL)[0])[: cfg.max_len]
state = positions.start_state(cfg, [tokens])
with tracing() as trace:  # keep the named intermediates of this forward
    _, cache = forward(
        model.params, cfg, np.asarray([tokens]), kv_cache.init_cache(cfg, 1, len(tokens)), state
    )
q = trace["layers.0.q"]  # [1,t,h,d]: layer 0's queries, after RoPE
kv = kv_cache.read(cache, 0)  # layer 0's keys and values as attention reads them, [1,k,s,d]
bias = attention_bias(cfg, positions.positions_for(cfg, state, len(tokens)), cache.max_len)
scale = cfg.head_dim**-0.5
print(f"q {q.shape}, K and V {kv.k.shape}, mask {bias.shape}")

naive = naive_attention(q, kv, bias, scale)
for name, out in [
    ("slim, blocks of 64 rows", slim_attention(q, kv, bias, scale, mb=64)),
    ("flash, 64 x 64 tiles", flash_attention(q, kv, bias, scale)),
]:
    print(f"{name:24s} max |out - naive| = {np.abs(out - naive).max():.2e}")

# %% [markdown]
# The differences are float32 rounding (sums taken in another order), many orders of magnitude
# below the values themselves.
#
# ## How large is a block?
#
# xFT chooses SlimAttention's block from an L2 budget of 2 MiB of float32 (`L2_BUDGET`
# values). With $qkv = T d$ and $score = T^2$ values: if $q$, $k$ and $v$ alone overflow the
# budget ($budget \le 2\,qkv$) there is one block; otherwise
# $splits = \lceil (2\,qkv + score) / (budget - 2\,qkv) \rceil$ and $m_b = \lceil T / splits
# \rceil$. `block_rows` is that rule. For the shipped model's head size and for the head size of
# the Llama 2 and 3 models (128):

# %%
print(f"L2 budget: {L2_BUDGET} float32 values ({L2_BUDGET * 4 / 2**20:.0f} MiB)")
for d in (cfg.head_dim, 128):
    for length in (256, 512, 1024, 2048):
        mb = block_rows(length, d)
        blocks = -(-length // mb)
        print(f"d={d:3d} T={length:5d}: blocks of {mb:4d} rows, {blocks} block(s)")

# %% [markdown]
# The shipped model's context (256 tokens of 32 values per head) fits in one block: its
# SlimAttention is naive attention with the causal skip. Blocking starts to matter at the
# paper's shape, 1024 tokens with heads of 128 values, which the rest of this chapter uses. At
# 2048 tokens of 128 values, $q$, $k$ and $v$ alone fill the budget and the rule falls back to
# one block; slimllm's C++ kernel therefore also caps a block's score rows at half the budget
# (`block` in `kernels/attention.py`).
#
# ## Which rows and keys each computes
#
# Both implementations get their scores from one function, `block_scores(qg, kv, lo, hi)`: the
# scores of a group of query rows against key slots `[lo, hi)`. To see what each algorithm does
# we *record* every call, by wrapping the function for the duration of a run (the library is
# not changed: `mock.patch.object` puts the original back afterwards). To know which query rows
# a call holds, we write each row's index into the first coordinate of its query vector; the
# other coordinates are random.


# %%
def attention_shape(heads, kv_heads, d, length):
    """A one-layer config with only the attention's shape (what the cache and mask need)."""
    return ModelConfig(
        vocab=1,
        width=heads * d,
        n_layers=1,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=d,
        ffn_width=1,
        max_len=length,
    )


T, D = 1024, 128  # the paper's figure: 1024 tokens, heads of 128 values
shape = attention_shape(1, 1, D, T)
rng = np.random.default_rng(0)
q_tagged = rng.standard_normal((1, T, 1, D)).astype(np.float32)  # [b,t,h,d], one head
q_tagged[0, :, 0, 0] = np.arange(T)  # coordinate 0 of row i is i
k_rand, v_rand = (rng.standard_normal((1, T, 1, D)).astype(np.float32) for _ in "kv")
big_slots = np.arange(T)[None]
big_kv = kv_cache.read(
    kv_cache.write(kv_cache.init_cache(shape, 1, T), 0, k_rand, v_rand, big_slots), 0
)
big_pos = Positions(big_slots, big_slots, np.zeros(1, np.int64), np.ones(1, np.float32))  # 0..T-1
big_bias = attention_bias(shape, big_pos, T)


@contextlib.contextmanager
def recording(module):
    """Record (first row, rows, lo, hi) of every score block `module.block_scores` computes."""
    calls, compute = [], module.block_scores

    def block_scores(qg, kv, lo, hi):
        rows = qg[0, 0, 0, :, 0]  # [b,k,g,t',d] -> the row indices written into the queries
        calls.append((int(rows[0]), len(rows), lo, hi))
        return compute(qg, kv, lo, hi)

    with mock.patch.object(module, "block_scores", block_scores):
        yield calls


with recording(key_blocks) as slim_calls:  # SlimAttention reads keys through key_blocks
    slim_attention(q_tagged, big_kv, big_bias, D**-0.5)
with recording(flash_module) as flash_calls:
    flash_attention(q_tagged, big_kv, big_bias, D**-0.5)
print(f"slim: {len(slim_calls)} calls, e.g. {slim_calls[:3]}")
print(f"flash: {len(flash_calls)} calls, e.g. {flash_calls[:3]}")

# %% [markdown]
# Each recorded call is a rectangle: its query rows down, its key slots across. In the figure
# below a colour is one unit of work that finishes on its own: one SlimAttention row block (left)
# or one flash query tile with all the key tiles it visits (right). The black line is the
# diagonal: a row sees the keys to the left of it (the causal mask). Look for three things:
# SlimAttention has only a few wide bands, each reaching to its *last* row's diagonal (the
# triangle above the diagonal inside a band is computed and masked); flash covers the triangle
# more tightly with small squares, but each band of query rows walks through the keys again;
# and slim's bands are drawn in pieces because the cache is read one key block
# (`key_blocks.KEY_BLOCK` slots) at a time, while the softmax still sees the whole row.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), sharey=True)
for ax, calls, title in [
    (axes[0], slim_calls, f"SlimAttention: rows in blocks of {block_rows(T, D)}"),
    (axes[1], flash_calls, "Flash: 64 x 64 tiles, online softmax"),
]:
    starts = sorted({row for row, *_ in calls})
    colours = plt.cm.tab10(np.arange(len(starts)) % 10)
    for row, rows, lo, hi in calls:
        colour = colours[starts.index(row)]
        ax.add_patch(plt.Rectangle((lo, row), hi - lo, rows, fc=colour, ec="white", lw=0.5))
    ax.plot([0, T], [0, T], color="black", lw=1)
    ax.set(xlim=(0, T), ylim=(T, 0), xlabel="key slot", title=title, aspect="equal")
axes[0].set_ylabel("query row")
plt.show()

# %% [markdown]
# ## The work, counted
#
# From the recorded calls (one head; multiply by the number of heads for a layer):
#
# - **scores computed**: every recorded rectangle, masked entries included. Each costs
#   $2d$ FLOPs for $QK^\top$ and $2d$ for $PV$.
# - **K and V streamed**: each call reads its key slots of $K$ (and the same slots of $V$ for
#   $PV$); a key row is read again by every block or tile of rows that sees it. This is the
#   "passes" of the paper: how many times the cache goes through the processor.
# - **largest score buffer**: the scores one unit of work must hold at once. SlimAttention's
#   whole block of rows is softmaxed together; flash holds one tile, plus its running $m$,
#   $\ell$ and accumulator $a$.
# - **accumulator rescales**: flash multiplies its $q_t \times d$ accumulator by
#   $e^{m - m'}$ at every key tile it visits; SlimAttention never does.


# %%
def work(calls, d, flash):
    """Counts from recorded (first row, rows, lo, hi) calls of one head."""
    scores = sum(rows * (hi - lo) for _, rows, lo, hi in calls)
    key_rows = sum(hi - lo for *_, lo, hi in calls)
    widths = {}
    for row, rows, _, hi in calls:  # a slim block's scores are softmaxed together
        widths[row] = (rows, max(hi, widths.get(row, (0, 0))[1]))
    if flash:
        buffer = max(rows * (hi - lo) + rows * (d + 2) for _, rows, lo, hi in calls)
    else:
        buffer = max(rows * width for rows, width in widths.values())
    return {
        "units of work (blocks / tiles)": len(widths),
        "scores computed": scores,
        "matmul GFLOP (4 d per score)": 4 * d * scores / 1e9,
        "K and V streamed (MB, float32)": 2 * key_rows * d * 4 / 1e6,
        "times each key is read (mean)": key_rows / T,
        "largest buffer (KiB)": buffer * 4 / 2**10,
        "accumulator rescales": len(calls) if flash else 0,
    }


counts = {"slim": work(slim_calls, D, False), "flash": work(flash_calls, D, True)}
print(f"one head, T={T}, d={D}; the causal triangle holds {T * (T + 1) // 2:,} scores")
print(f"{'':34s} {'slim':>10s} {'flash':>10s}")
for name in counts["slim"]:
    a, b = counts["slim"][name], counts["flash"][name]
    print(f"{name:34s} {a:10.4g} {b:10.4g}")

# %% [markdown]
# Read the table this way. SlimAttention computes *more* scores than flash (its wide blocks
# round the causal triangle up to whole blocks, flash to 64 x 64 squares) and so more FLOPs,
# yet it streams the cache fewer times, keeps no running statistics, and never rescales an
# output: its inner loop is two large matrix products and one plain softmax over data that sits
# in L2. Flash keeps a buffer that would fit in L1, which matters on a GPU whose fast memory is
# small; on a CPU with a megabyte or two of L2 per core the extra passes and rescales are what
# cost.
#
# ## Measured time
#
# Now the JAX backend, jit-compiled, on this machine, through slimllm's own attention benchmark
# (`bench/attention.py`: `layer_kv` fills a cache, `causal_bias` builds the mask,
# `compiled_attention` compiles one attention call ahead of time, `interleaved` times the
# variants in turns). In the JAX backend SlimAttention runs as slimllm's C++ kernel when it is
# built (`slimllm.kernels`); its pure-XLA fallback is timed too, so that slim and flash are
# also compared in the same compiler.
#
# The machine that runs this notebook is shared and noisy (other jobs, two cores): absolute
# milliseconds mean little and change from run to run. Within one run the variants are timed
# in turns, so a change of load falls on all of them alike: compare the **ratios**.
# The shape: the paper's 1024 tokens through the part of a Llama-3-8B layer that one rank
# holds when four ranks share it (chapter 6: its 32 query heads and 8 kv heads of 128 values,
# split four ways; the paper runs one rank per CPU socket).


# %%
def timings(heads, kv_heads, d, length, runs=7):
    """Milliseconds of each run of one attention prefill, per kind (`bench/attention.py`)."""
    shape = attention_shape(heads, kv_heads, d, length)
    q = jnp.asarray(np.random.default_rng(1).standard_normal((1, length, heads, d), np.float32))
    kv = layer_kv(shape, 1, length, "float32")
    bias = causal_bias(shape, 1, 0, length, kv.length)
    calls = {}
    if kernels.available():
        calls["slim (C++ kernel)"] = compiled_attention("slim", q, kv, bias)[1]
    with kernels.choose("xla"):  # trace the pure-XLA forms
        calls["slim (XLA)"] = compiled_attention("slim", q, kv, bias)[1]
        calls["flash (XLA)"] = compiled_attention("flash", q, kv, bias)[1]
    return interleaved(calls, runs)


ms = timings(32 // 4, 8 // 4, 128, T)
median = {kind: float(np.median(runs)) for kind, runs in ms.items()}
for kind, value in median.items():
    print(f"{kind:18s} median {value:8.2f} ms   flash / this = {median['flash (XLA)'] / value:.2f}")

# %% [markdown]
# On the left, every timed run as a dot: the spread is the machine's noise. On the right, each
# median as a fraction of flash's (below 1: faster than flash). Look at the C++ kernel's bar
# against flash's: that is the paper's comparison (one tight loop per block of rows, exact
# softmax, no rescaling; the paper measured 3.8 times on one Xeon socket). The XLA form of
# SlimAttention shows what the same blocking gets from a general compiler, whose batched
# products run neither as fast nor as parallel as a hand-written loop: compare its bar with
# the kernel's to see how much of the gain is the algorithm and how much the kernel.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
for i, (kind, runs) in enumerate(ms.items()):
    left.plot(np.full(len(runs), i), runs, "o", alpha=0.6)
    left.plot([i - 0.25, i + 0.25], [median[kind]] * 2, color="black")
left.set_xticks(range(len(ms)), list(ms))
left.set(ylabel="ms per call", ylim=(0, None), title=f"Each run ({T} tokens, 8/2 heads x 128)")
ratios = [v / median["flash (XLA)"] for v in median.values()]
bars = right.bar(list(median), ratios, color=[f"C{i}" for i in range(len(median))])
right.bar_label(bars, fmt="%.2f")
right.axhline(1.0, color="black", lw=0.8)
right.set(ylabel="median time / flash's (same run)", title="Relative to flash")
plt.show()

# %% [markdown]
# ## What to try
#
# - Change `mb` in `slim_attention(..., mb=...)` or the tiles in `flash_attention(..., q_tile=,
#   k_tile=)` and record the calls again: how do the counts move? Which block size makes
#   SlimAttention compute the fewest masked scores, and what does it cost in passes?
# - Draw the decode case: one query row (`T=1` query at the end of a long cache) with
#   `key_splits=4`, SlimAttention's few-heads path that splits the keys and merges the chunks
#   exactly.
# - Time an int8 cache: pass `"int8"` instead of `"float32"` to `layer_kv`. Both kinds read it
#   in place, one key block at a time.
# - Time the shipped model's own attention, `timings(8, 2, 32, 256)`: at such small sizes the
#   fixed cost of each call weighs on every variant.
# - Run `slimllm bench attention` for the paper's full shape (32 heads) with more runs.
