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
# # 3. Attention
#
# Attention is the one place where tokens exchange information. This chapter shows the
# definition slimllm tests every faster attention against, the masks that decide which keys a
# query may read (causal, with a cache, prefix-LM, ALiBi), how grouped-query attention lets
# several query heads share one key/value head, and finally the attention maps of the shipped
# model on a real sentence.

# %%
import inspect

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm

import slimllm
from slimllm.reference import kv_cache
from slimllm.reference.attention import (
    attention_bias,
    group_bias,
    group_queries,
    naive_attention,
    ungroup,
)
from slimllm.reference.model import forward, tracing
from slimllm.reference.ops import linear, softmax
from slimllm.reference.positions import advance, positions_for, start_state
from slimllm.weights.families import detect

model = slimllm.load(slimllm.SHIPPED_MODEL)
cfg, params, tok = model.cfg, model.params, model.tokenizer


def config_of(hf: dict):
    """The ModelConfig slimllm's loader makes from a published config.json."""
    return detect(hf).config_from_hf(hf)


# %% [markdown]
# ## The definition
#
# For one head, with queries `Q [t,d]`, keys `K [s,d]` and values `V [s,d]`:
#
# $$O = \text{softmax}\!\left(\frac{Q K^\top}{\sqrt d} + B\right) V .$$
#
# Row `i` of the softmax is a probability distribution over the `s` keys: how much query `i`
# takes from each value. `B` is an additive bias: `0` where a key is visible, `−∞` where it is
# not (its probability becomes exactly 0), plus ALiBi's distance penalty for the models that
# use it. The reference writes this literally, for every head at once:

# %%
print(inspect.getsource(naive_attention))

# %% [markdown]
# `kv` is the layer's KV cache (chapter 4): keys and values are always read back from the
# cache, so `s` is the cache length, not the number of new tokens. Unwritten slots are masked
# because they lie in the future of every query.
#
# ## Masks
#
# `attention_bias(cfg, positions, s)` builds `B` from where the queries sit (their cache
# slots) and the config. Four cases, each made by the same calls a forward pass makes:
#
# 1. **Causal prefill** (the shipped model, 10 prompt tokens): query `i` sees keys `0..i`.
# 2. **Causal with a cache**: 6 tokens are already cached, 4 new ones arrive (the next chunk
#    of a prompt prefilled in pieces), in a cache of 16 slots. The new queries see all
#    the cached keys and the new keys up to their own slot; slots 10..15 are not written yet
#    and are masked for everyone.
# 3. **Prefix-LM** (ChatGLM-6B): the prompt before its block start token `<sop>` is read
#    bidirectionally: every query sees all of it. From `<sop>` on, the block is causal.
# 4. **ALiBi** (Baichuan-13B): the causal mask plus `slope_h · (n − m)`; shown for one head,
#    the colour is the bias (white: masked).

# %%
prompt = list(range(10))  # any 10 token ids: the mask depends on positions only
state = start_state(cfg, [prompt])
causal = attention_bias(cfg, positions_for(cfg, state, 10), 10)[0, 0]  # [b,1,t,s] -> [t,s]

cached = advance(state, 6)  # 6 tokens already in the cache
chunk = attention_bias(cfg, positions_for(cfg, cached, 4), 16)[0, 0]  # 4 new queries, 16 slots

CHATGLM_6B = {  # THUDM/chatglm-6b's config.json
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "hidden_size": 4096,
    "inner_hidden_size": 16384,
    "num_attention_heads": 32,
    "num_layers": 28,
    "vocab_size": 130528,
    "max_sequence_length": 2048,
    "layernorm_epsilon": 1e-5,
    "position_encoding_2d": True,
    "bos_token_id": 130004,
    "eos_token_id": 130005,
    "mask_token_id": 130000,
    "gmask_token_id": 130001,
    "pad_token_id": 3,
}
glm = config_of(CHATGLM_6B)
glm_prompt = [5, 6, 7, 8, 9, 10, CHATGLM_6B["gmask_token_id"], glm.block_start_id]
glm_state = start_state(glm, [glm_prompt])  # prefix = index of <sop>
prefix_lm = attention_bias(glm, positions_for(glm, glm_state, 12), 12)[0, 0]  # + 4 generated

BAICHUAN_13B = {  # Baichuan-13B-Base's config.json
    "architectures": ["BaichuanForCausalLM"],
    "model_type": "baichuan",
    "hidden_size": 5120,
    "intermediate_size": 13696,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "vocab_size": 64000,
    "model_max_length": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
}
baichuan = config_of(BAICHUAN_13B)
alibi = attention_bias(baichuan, positions_for(baichuan, start_state(baichuan, [prompt]), 10), 10)
print("ALiBi bias", alibi.shape, "(one [t,s] matrix per head); the others", causal.shape)

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 4), layout="constrained")
head = 7
alibi_head = np.where(np.isfinite(alibi[0, head]), alibi[0, head], np.nan)  # masked: blank
panels = [
    ("causal prefill", causal),
    ("6 cached + 4 new, 16 slots", chunk),
    (f"prefix-LM (prefix {glm_state.prefix[0]})", prefix_lm),
    (f"ALiBi, Baichuan-13B head {head}", alibi_head),
]
for ax, (title, bias) in zip(axes, panels):
    if title.startswith("ALiBi"):
        image = ax.imshow(bias, cmap="viridis", aspect="auto")
    else:
        ax.imshow(np.isfinite(bias), cmap="Greys", vmin=0, vmax=1.4, aspect="auto")
    ax.set_title(title)
    ax.set_xticks(range(0, bias.shape[1], 2))
    ax.set_xlabel("key slot")
axes[0].set_ylabel("query slot")
axes[1].set_yticks(range(4), [f"{6 + i}" for i in range(4)])
fig.colorbar(image, ax=axes[3], shrink=0.8, label="bias")
plt.show()

# %% [markdown]
# Dark cells are visible keys. In the second panel the rows are the 4 new queries at slots
# 6..9: each sees the 6 cached keys, itself and the new keys before it, and nothing of the
# empty slots 10..15.
#
# ## Grouped-query attention
#
# A decoder keeps every layer's keys and values for every past token (chapter 4), so their
# size is what limits long contexts and large batches. Grouped-query attention (GQA, Ainslie
# et al. 2023) keeps `h` query heads but only `k < h` key/value heads: each kv head serves a
# group of `g = h/k` query heads. Multi-head attention is `k = h`, multi-query attention
# `k = 1`. In the reference, `group_queries` reshapes the query heads `[b,t,h,d]` into
# `[b,k,g,t,d]`, so that one einsum multiplies each group with its own kv head.
#
# Below, which kv head each query head reads, found by passing the head numbers themselves
# through `group_queries`: for the shipped model (8 query heads, 2 kv heads) and for
# Llama-3-8B (32 and 8).

# %%
LLAMA3_8B = {  # Llama-3-8B's config.json: the fields that set its shapes
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def reads(c) -> np.ndarray:
    """[h,k] matrix: 1 where query head h reads kv head k."""
    heads = np.arange(c.n_heads, dtype=np.float32).reshape(1, 1, c.n_heads, 1)  # [b,t,h,d]
    grouped = group_queries(heads, c.n_kv_heads)[0, :, :, 0, 0]  # [b,k,g,t,d] -> [k,g]
    table = np.zeros((c.n_heads, c.n_kv_heads))
    for kv, members in enumerate(grouped.astype(int)):
        table[members, kv] = 1
    return table


fig, axes = plt.subplots(1, 2, figsize=(8, 5), layout="constrained")
for ax, (name, c) in zip(axes, (("shipped model", cfg), ("Llama-3-8B", config_of(LLAMA3_8B)))):
    ax.imshow(reads(c), cmap="Greys", aspect="auto")
    ax.set_xticks(range(c.n_kv_heads))
    ax.set_title(f"{name}: h={c.n_heads}, k={c.n_kv_heads}, g={c.n_rep}")
    ax.set_xlabel("kv head")
    ax.set_ylabel("query head")
plt.show()

# %% [markdown]
# ## The shipped model's attention on a real sentence
#
# The forward pass does not keep the attention probabilities, but the trace keeps each
# layer's queries and keys after RoPE (chapter 1). The first lines of `naive_attention`,
# applied to them with the same bias, give the probabilities back. To be sure they are the
# model's, the next cell multiplies them with the values and the output projection and
# compares the result with the traced attention output.

# %%
text = "The sorted() function returns a new sorted list from the items in an iterable."
ids = tok.encode(text)
t = len(ids)
state = start_state(cfg, [ids])
pos = positions_for(cfg, state, t)
with tracing() as trace:
    forward(params, cfg, np.array([ids]), kv_cache.init_cache(cfg, 1, t), state)
bias = attention_bias(cfg, pos, t)  # [b,1,t,s], s = t: the cache holds exactly this prompt


def attention_probs(layer: int) -> np.ndarray:
    """softmax(q kᵀ/√d + bias) of one traced layer, [b,k,g,t,s] (as naive_attention computes)."""
    q, k = trace[f"layers.{layer}.q"], trace[f"layers.{layer}.k"]  # [b,t,h,d], [b,s,k,d]
    qg = group_queries(q, cfg.n_kv_heads)  # [b,t,h,d] -> [b,k,g,t,d]
    scores = np.einsum("bkgtd,bskd->bkgts", qg, k) * cfg.head_dim**-0.5  # -> [b,k,g,t,s]
    return softmax(scores + group_bias(bias, cfg.n_kv_heads))


probs = np.stack([attention_probs(i) for i in range(cfg.n_layers)])  # [layers,b,k,g,t,s]
for i in range(cfg.n_layers):
    v = trace[f"layers.{i}.v"]  # [b,s,k,d]
    out = ungroup(np.einsum("bkgts,bskd->bkgtd", probs[i], v))  # [b,k,g,t,d] -> [b,t,h,d]
    out = linear(out.reshape(1, t, -1), params.layers[i].wo)  # [b,t,h*d] -> [b,t,e]
    same = np.allclose(out, trace[f"layers.{i}.attn_out"], atol=1e-5)
    print(f"layer {i}: recomputed output == traced attn_out: {same}")
maps = probs[:, 0].reshape(cfg.n_layers, cfg.n_heads, t, t)  # [layers,h,t,s]
print("maps", maps.shape, "| every row sums to 1:", np.allclose(maps.sum(-1), 1))

# %% [markdown]
# All 32 maps, one row per layer, one column per query head (heads `0-3` share kv head 0,
# heads `4-7` kv head 1). Each row of a map is one query token's distribution over the
# tokens before it. The upper triangle is empty: that is the causal mask.
#
# What to look for in a trained model: **previous-token heads** (a bright line just below the
# diagonal: each token reads the one before it, which lets later layers know "what came
# before me"), heads that put most of their weight on the first token `<s>` (a bright first
# column: a place to park attention when nothing else is relevant, often called an
# *attention sink*), and broader heads that gather several related words. An untrained
# model's maps are close to uniform over the visible keys. The colour scale is a square root,
# so that weights of a few percent are visible too.

# %%
weights = PowerNorm(gamma=0.5, vmin=0, vmax=1)  # stretches small weights so they show
fig, axes = plt.subplots(cfg.n_layers, cfg.n_heads, figsize=(14, 7.5), layout="constrained")
for layer in range(cfg.n_layers):
    for head in range(cfg.n_heads):
        ax = axes[layer, head]
        ax.imshow(maps[layer, head], cmap="magma", norm=weights)
        ax.set_xticks([])
        ax.set_yticks([])
        if layer == 0:
            ax.set_title(f"head {head}", fontsize=9)
        if head == 0:
            ax.set_ylabel(f"layer {layer}")
plt.show()

# %% [markdown]
# Two numbers summarise each head: the mean weight its queries give to the previous token,
# and the mean weight they give to the first token (both averaged over the query positions
# from 2 on, where both are real choices).

# %%
rows = np.arange(2, t)
previous = maps[:, :, rows, rows - 1].mean(-1)  # [layers,h]
first = maps[:, :, rows, 0].mean(-1)  # [layers,h]

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
summaries = {"weight on the previous token": previous, "weight on <s>": first}
for ax, (title, value) in zip(axes, summaries.items()):
    image = ax.imshow(value, cmap="viridis", vmin=0, vmax=1)
    ax.set_title(title)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(cfg.n_heads))
    ax.set_yticks(range(cfg.n_layers))
fig.colorbar(image, ax=axes, shrink=0.9)
plt.show()

# %% [markdown]
# The head with the strongest previous-token score, with the tokens written out. Read it row
# by row: the row of a token is where that token looked.

# %%
layer, head = np.unravel_index(np.argmax(previous), previous.shape)
pieces = [tok.decode([i]) or "<s>" for i in ids]
fig, ax = plt.subplots(figsize=(8, 7))
image = ax.imshow(maps[layer, head], cmap="magma", norm=weights)
ax.set_xticks(range(t), pieces, rotation=90)
ax.set_yticks(range(t), pieces)
ax.set_xlabel("key (what is read)")
ax.set_ylabel("query (who reads)")
ax.set_title(f"layer {layer}, head {head}")
fig.colorbar(image, ax=ax, shrink=0.8)
plt.show()

# %% [markdown]
# ## What to try
#
# - Change `text`: do the heads that follow the previous token keep doing so on another
#   sentence? Do the first-token heads?
# - Replace `naive_attention` with `slim_attention` or `flash_attention` (in `reference/`):
#   they must give the same output to rounding; chapter 5 shows why they are faster.
# - Build the mask of a decode step with `positions_for(cfg, advance(state, t), 1)`: a single
#   query row. How many keys does it see?
# - Turn the shipped config into an ALiBi model with `cfg.replace(pos="alibi")` and draw
#   `attention_bias` for each of its 8 heads.
