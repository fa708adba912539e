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
# # 6. Tensor parallelism
#
# This chapter splits the shipped model over two ranks the way the paper does (one rank per CPU
# socket) and follows the bytes: which weights each rank holds, where the ranks must talk (two
# all-reduces per block), how many bytes a decode step sends, and what the paper's two tricks,
# broadcasting token ids and reducing top-k candidates, save on real vocabularies.
#
# Two ranks need two devices. In one process JAX can pretend that the CPU is several devices,
# but only if it is told before it starts: the first cell sets `XLA_FLAGS` before anything
# imports `jax` (slimllm imports it lazily, so `import slimllm` is safe after this line too).

# %%
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

# %%
import re
import sys
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import slimllm
from slimllm.jaxbackend import positions as device_positions
from slimllm.jaxbackend import sharding, tp
from slimllm.jaxbackend.kv_cache import init_cache
from slimllm.jaxbackend.model import forward
from slimllm.jaxbackend.params import to_device
from slimllm.jaxbackend.sampling import Sampling, seed_words
from slimllm.reference import positions
from slimllm.reference.sampling import SamplingConfig

slimllm.compile_cache(None)  # compiled programs stay in memory: this notebook writes no files
print(jax.devices())

# %% [markdown]
# ## Splitting a matrix product
#
# A linear layer computes $y = xW$ with $W$ of shape [in, out]. Two ways to share it between
# $R$ ranks (Megatron-LM's names):
#
# - **column-parallel**: $W = [W_1 \; W_2]$, split along its output columns. Every rank needs
#   the whole input $x$ and computes its own slice of the output, $y_r = x W_r$. No
#   communication, but the output is split.
# - **row-parallel**: $W = \begin{bmatrix} W_1 \\ W_2 \end{bmatrix}$, split along its input
#   rows. If rank $r$ holds the matching slice $x_r$ of the input, it computes a *partial sum*
#   $x_r W_r$, and $y = \sum_r x_r W_r$ needs an **all-reduce** (every rank sends its partial
#   sum and receives the total).
#
# A transformer block chains them so that each sublayer costs one all-reduce. Attention: the
# query, key and value projections are column-parallel *by heads* (a rank owns $h/R$ query
# heads and the kv heads they use), RoPE, the KV cache and attention run on local heads only,
# and the output projection $W_o$ is row-parallel: **all-reduce #1**. MLP: gate and up are
# column-parallel by FFN columns, the SwiGLU product is elementwise and stays local, and down
# is row-parallel: **all-reduce #2**. Norms are computed redundantly on every rank, on the
# replicated hidden state.
#
# slimllm declares all of this in one table, `jaxbackend/sharding.py`'s `SPECS`: parameter
# name -> `PartitionSpec` over the mesh axis `"tp"`, in the reference layout [in, out].

# %%
model = slimllm.load(slimllm.SHIPPED_MODEL)
cfg = model.cfg
R = 2
ROLE = {
    sharding.COLUMNS: "column-parallel",
    sharding.ROWS: "row-parallel",
    sharding.SPLIT: "split (a bias)",
    sharding.REPLICATED: "replicated",
}
plan = sharding.ShardPlan.of(cfg, R)
rank0 = sharding.local_slice(sharding.prepare(model.params, cfg, plan), rank=0, tp=R)
full_layer, rank_layer = model.params.layers[0], rank0.layers[0]
print(f"{'weight':11s} {'spec':24s} {'role':16s} {'whole':>13s} {'rank 0 holds':>13s}")
for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"):
    whole, mine = getattr(full_layer, name), getattr(rank_layer, name)
    spec = sharding.SPECS[name]
    print(f"{name:11s} {spec!s:24s} {ROLE[spec]:16s} {whole.shape!s:>13s} {mine.shape!s:>13s}")
for name in ("embed", "final_norm", "lm_head"):
    whole = (cfg.width, cfg.vocab) if name == "lm_head" else getattr(model.params, name).shape
    spec, mine = sharding.SPECS[name], getattr(rank0, name)
    print(f"{name:11s} {spec!s:24s} {ROLE[spec]:16s} {whole!s:>13s} {mine.shape!s:>13s}")

# %% [markdown]
# The shipped model ties its LM head to the embedding table (`tied_head`). Under tensor
# parallelism the two roles want different layouts, so `sharding.prepare` gives the head its
# own copy: the embedding stays whole on every rank (each rank looks up the token ids itself),
# the head is split by vocabulary (each rank scores its slice of the vocabulary).
#
# `ShardPlan` is what each rank holds, computed once from (config, tp). With more ranks than
# kv heads (this model has 2), each kv head is copied so that every rank holds the one its
# query heads read:

# %%
for ranks in (1, 2, 4, 8):
    print(sharding.ShardPlan.of(cfg, ranks))

# %% [markdown]
# The figure draws one block's weight matrices of the shipped model to scale, [in, out] as in
# the table (input rows down, output columns across), coloured by the rank that holds each
# part: "columns" is column-parallel, "rows" row-parallel, grey ("whole") is held by every
# rank. Below them, at a smaller scale, the embedding table (transposed to the head's [e, v]
# shape) and the vocabulary-parallel LM head. Note how each column split feeds a row split:
# the heads rank 0 computes with its columns of `wq`, `wk`, `wv` are exactly the inputs its
# rows of `wo` multiply, and likewise for the MLP, so nothing is exchanged in between.

# %%
fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 5.5), height_ratios=(3, 1))
colours = [f"C{r}" for r in range(R)]  # one colour per rank
SPLITS = {sharding.COLUMNS: "columns", sharding.ROWS: "rows", sharding.REPLICATED: "whole"}


def draw(ax, x0, name, rows, cols, spec):
    """A [rows, cols] matrix at x0, split as `spec` says between R ranks."""
    for r in range(R):
        if spec == sharding.COLUMNS:
            xy, w, h, c = (x0 + r * cols / R, 0), cols / R, rows, colours[r]
        elif spec == sharding.ROWS:
            xy, w, h, c = (x0, r * rows / R), cols, rows / R, colours[r]
        else:
            xy, w, h, c = (x0, 0), cols, rows, "lightgrey"
        ax.add_patch(plt.Rectangle(xy, w, h, fc=c, ec="black", lw=0.8))
    ax.text(x0 + cols / 2, -20, f"{name}\n{SPLITS[spec]}", ha="center", va="bottom", fontsize=8)
    return x0 + cols + 130


x = 0
for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
    rows, cols = getattr(full_layer, name).shape
    x = draw(top, x, name, rows, cols, sharding.SPECS[name])
top.set(xlim=(-60, x - 70), ylim=(cfg.ffn_width + 20, -130), aspect="equal", xticks=[], yticks=[])
top.set_title(f"One block of the shipped model over {R} ranks (blue: rank 0, orange: rank 1, ...)")
x = draw(bottom, 0, "embed, as [e, v]", cfg.width, cfg.vocab, sharding.SPECS["embed"])
x = draw(bottom, x, "lm_head", cfg.width, cfg.vocab, sharding.SPECS["lm_head"])
bottom.set(xlim=(-60, x - 70), ylim=(cfg.width + 20, -300), aspect="equal", xticks=[], yticks=[])
plt.show()

# %% [markdown]
# ## Where the ranks talk
#
# The model code is the same for one rank and many: every collective goes through a `Comm`
# (`jaxbackend/tp.py`), whose methods are `sum`, `max`, `min` and `gather`. The one-rank `Comm`
# makes each of them the identity; `AxisComm` calls `lax.psum` and friends inside
# `shard_map` across this process's devices; `MpiComm` calls MPI across processes.
#
# That interface lets us *instrument* the model: a `Comm` that plays rank 0 of two, writes
# down every collective the model asks for (with the function that asked), and returns its
# input unchanged. We run one decode step of rank 0's slice of the weights through it with
# `jax.eval_shape`, which traces the program (every collective is asked for) without computing
# anything.


# %%
@dataclass(frozen=True)
class RecordingComm(tp.Comm):
    """Rank 0 of `size`: records each collective (kind, caller, shape, dtype), moves no data."""

    log: list = field(default_factory=list, compare=False)

    def note(self, kind, x, depth=2):
        caller = sys._getframe(depth).f_code.co_name
        self.log.append((kind, caller, tuple(x.shape), jnp.dtype(x.dtype)))

    def sum(self, x):
        self.note("all-reduce sum", x, depth=3)  # the caller of row_parallel
        return x

    def max(self, x):
        self.note("all-reduce max", x)
        return x

    def min(self, x):
        self.note("all-reduce min", x)
        return x

    def gather(self, x):
        self.note("all-gather", x)
        return jnp.stack([x] * self.size)


def nbytes(shape, dtype):
    return int(np.prod(shape)) * jnp.dtype(dtype).itemsize


comm = RecordingComm(size=R)
params = to_device(rank0)  # rank 0's slice, in the device layout
cache = init_cache(cfg, 1, cfg.max_len, "float32", kv_heads=plan.kv_heads)
prompt = model.tokenizer.encode("The os module provides")
state = positions.advance(positions.start_state(cfg, [prompt]), len(prompt))  # after prefill


def decode_step(params, token, cache, state):
    return forward(params, cfg, token, cache, state, slimllm.Runtime(), comm=comm)


logits, _ = jax.eval_shape(
    decode_step,
    params,
    jnp.zeros((1, 1), jnp.int32),
    cache,
    device_positions.device_state(state),
)
for kind, caller, shape, dtype in comm.log:
    print(f"{kind:15s} in {caller:16s} {dtype!s:8s}{shape!s:12s} {nbytes(shape, dtype):6d} bytes")
step_bytes = sum(nbytes(s, d) for *_, s, d in comm.log)
print(f"{len(comm.log)} collectives, {step_bytes} bytes from each rank per decode step")
print(f"rank 0's logits: {logits.shape} (its half of the vocabulary)")

# %% [markdown]
# Exactly two per block, in the order the block computes them: the attention output
# (`attention_block`) and the MLP down projection (`mlp_block`), each summing a
# [batch, tokens, width] array of partial results. Nothing else crosses ranks inside the model:
# not the token ids (every rank holds them), not the embeddings (every rank embeds), not the
# KV cache (each rank caches its own heads).
#
# The recording shows what the model *asks* for. To check what actually runs, we generate
# with `tp=2` (the engine compiles each token's step, decode then greedy choice, under
# `shard_map` over the two devices) and count the collectives in the program XLA compiled: the
# two per block, and the choice's two (next section). The tokens are also compared with the
# NumPy reference, which runs the whole model in one piece: tensor parallelism must not change
# a single token.

# %%
rt = slimllm.Runtime(tp=R)
split = slimllm.generate(model, ids=prompt, max_new_tokens=16, runtime=rt, mode="stream")
whole = slimllm.generate(model, ids=prompt, max_new_tokens=16, backend="numpy")
print("tp=2 tokens == NumPy reference tokens:", split.ids == whole.ids)
print(repr(split.text))

engine = model.engine(rt)
(program,) = [c.program for key, c in engine.programs.items() if key[0] == "step_fn"]
args = (
    engine.params,
    jnp.asarray([5], jnp.int32),  # the token just chosen
    engine.new_cache(1, cfg.max_len, "float32"),
    device_positions.device_state(state),
    jnp.zeros((1, cfg.vocab), bool),  # tokens seen (for a repetition penalty)
    jnp.asarray(seed_words([0])),
    np.int32(1),  # the step
    Sampling.of(SamplingConfig()),  # greedy
)
args = engine.place(args, sharding.LAYOUTS["step_fn"][0])
hlo = program.lower(*args).compile().as_text()  # the compiled step
compiled = re.findall(r"= (\w+)\[([\d,]*)\]\S* (all-reduce|all-gather|all-to-all)\(", hlo)
for dtype, dims, op in compiled:
    print(f"{op} of {dtype}[{dims}]")
print(f"{len(compiled)} collectives in the compiled step: 2 per block, 2 for the choice")

# %% [markdown]
# ## The vocabulary: getting the token out
#
# After the last block every rank holds the full hidden state, and its slice of the LM head
# gives logits for its slice of the vocabulary. The next token needs the whole vocabulary. The
# obvious way gathers all logits ($v$ floats per row); the paper's way (`tp.py`) reduces
# candidates instead:
#
# - **greedy**: each rank offers its best (value, global id); a `max` over ranks finds the best
#   value and a `min` over the ids that reach it breaks ties to the lowest id, exactly
#   `argmax` over the full vocabulary. Two reductions of one number per row.
# - **top-k sampling**: a token outside every rank's local top-k cannot be in the global
#   top-k, so each rank offers its local top-k (values and ids) and every rank runs the same
#   processors and the same seeded draw on the gathered $R \cdot k$ candidates.
# - only sampling *without* top-k (top-p or min-p alone) needs the full logits.
#
# The same recording `Comm` lists what each choice sends:

# %%
local_logits = jnp.zeros((1, plan.vocab), jnp.float32)  # rank 0's slice [b, v/R]
seen = jnp.zeros((1, plan.vocab), bool)
seeds = jnp.asarray(seed_words([0]))
choices = {
    "greedy": SamplingConfig(),
    "top-k 40": SamplingConfig(temperature=0.8, top_k=40),
    "top-p 0.9": SamplingConfig(temperature=0.8, top_p=0.9),
}
for label, sc in choices.items():
    comm.log.clear()
    jax.eval_shape(
        lambda x, s, sc=sc: tp.sample_ranked(x, Sampling.of(sc, R), s, seeds, 0, comm),
        local_logits,
        seen,
    )
    print(f"{label}:")
    for kind, caller, shape, dtype in comm.log:
        print(f"  {kind:15s} in {caller:18s} {dtype!s:8s}{shape!s:10s} {nbytes(shape, dtype)} B")

# %% [markdown]
# Greedy sends two 4-byte numbers per row. Top-k gathers each rank's candidates (the
# requested k rounded up to a power of two, a static size) plus one flag: the full gather
# listed after them sits in a branch taken only when a rank holds more logits tied with the
# k-th value than it offered, so that ties are never cut differently from the one-rank sampler.
# Top-p alone gathers every logit.
#
# ## What the paper's two tricks save, on real vocabularies
#
# The same count for published model shapes, per decode step and row: the size of what every
# rank receives (an all-reduce's result, or everything a gather collects from the $R$ ranks),
# in float32 as slimllm computes (bfloat16 would halve the float rows). The shipped model's
# all-reduces are checked against the recording above. "Embeddings broadcast" is what a
# master rank would send if it embedded the token and shipped the vector ($e$ floats) instead
# of the id (one integer); "full logits" is what gathering them would cost instead of the top-k
# or greedy reduction. (slimllm goes one step further than sending the id: the reductions above
# leave the chosen id on every rank, and a sampled draw uses the same seed everywhere, so after
# the prompt no id travels at all. Under MPI the prompt's ids and the settings are broadcast
# once, before the first token: `api.generate` calls `mpi.bcast_object`.)

# %%
MODELS = {  # published config.json values: vocab, width, layers
    "shipped": (cfg.vocab, cfg.width, cfg.n_layers),
    "Llama-2-7B": (32000, 4096, 32),
    "Llama-3-8B": (128256, 4096, 32),
    "Qwen2-72B": (152064, 8192, 80),
}
SLOTS = 64  # top-k 40 rounded up to a power of two


def step_traffic(vocab, width, layers, ranks=R):
    """Bytes per decode step and row: what crosses ranks with each choice."""
    return {
        "all-reduces (2 per block)": 2 * layers * width * 4,
        "embeddings broadcast": width * 4,
        "token id broadcast": 4,
        "full logits gathered": vocab * 4,
        "top-k candidates": ranks * SLOTS * (4 + 4),
        "greedy (value, id)": 4 + 4,
    }


traffic = {name: step_traffic(*shape) for name, shape in MODELS.items()}
assert traffic["shipped"]["all-reduces (2 per block)"] == step_bytes  # the recording above
print(f"{'':11s} {'all-reduces':>12s} {'full logits':>12s} {'top-k':>8s} {'logits/reduces':>15s}")
for name, t in traffic.items():
    reduces, logits_b = t["all-reduces (2 per block)"], t["full logits gathered"]
    topk = t["top-k candidates"]
    print(f"{name:11s} {reduces:12,} {logits_b:12,} {topk:8,} {logits_b / reduces:15.0%}")

# %% [markdown]
# In the figure (log scale) compare, for each model, the three ways out (full logits, top-k,
# greedy) and the two ways in (embeddings, ids) with the all-reduces every step pays anyway.
# The larger the vocabulary relative to width times depth, the more gathering logits would
# have cost: for the Llama 3 vocabulary it is a large fraction of the whole step's
# all-reduce traffic, while the top-k candidates stay near a kilobyte whatever the vocabulary.
# The saving on the way in is smaller per step (one vector versus one integer), but during
# prefill it is multiplied by the prompt length.

# %%
fig, ax = plt.subplots(figsize=(11, 4.5))
kinds = list(traffic["shipped"])
height = 0.8 / len(kinds)
for i, kind in enumerate(kinds):
    values = [traffic[name][kind] for name in MODELS]
    ax.barh(np.arange(len(MODELS)) + i * height, values, height, label=kind)
ax.set_yticks(np.arange(len(MODELS)) + height * (len(kinds) - 1) / 2, list(MODELS))
ax.set_xscale("log")
ax.invert_yaxis()
ax.set(xlabel="bytes per decode step and row (float32)", title=f"What crosses {R} ranks")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
plt.show()

# %% [markdown]
# Bytes are only half the cost: an all-reduce also waits for the slowest rank, twice per block.
# At batch 1 these messages are small, so that waiting (latency), rather than bandwidth, is
# most of what communication costs a decode step. The number of collectives per step is
# therefore kept fixed by construction: slimllm writes every reduction of the model in one
# named function (`model.row_parallel`), used exactly twice per block.
#
# ## What to try
#
# - Set `R = 4` (and the device count in the first cell): `ShardPlan` now copies each kv head;
#   re-run the recording and see whether the collectives change.
# - Record a prefill instead of a decode step: call `decode_step` with all the prompt's tokens
#   (`jnp.asarray([prompt])`) and the state before them (`positions.start_state(cfg, [prompt])`
#   through `device_positions.device_state`). The all-reduces grow with the number of tokens;
#   the sampling traffic does not.
# - Run the same model over two MPI processes: `mpiexec -n 2 slimllm generate --model
#   slimllm/models/pydoc-llama --prompt "The os module" --max-new-tokens 16` (the `MpiComm`
#   transport: same two collectives per block, now between processes).
# - Compare `slimllm diff --model slimllm/models/pydoc-llama --a numpy --b jax:tp2`: every
#   intermediate of the split model against the reference.
