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
# # 2. Positions
#
# Attention compares every query with every key, and without help it cannot tell where a key
# is: a sentence and its shuffled words would look alike. This chapter shows how the models
# slimllm runs put position into attention: RoPE, which rotates queries and keys by an angle
# that grows with position; the two ways long-context models stretch those rotations
# (Llama-3.1's wavelength scaling and Qwen's dynamic NTK); ALiBi, which adds a penalty that
# grows with distance instead; and ChatGLM's 2-D RoPE, which gives each token two positions.
# Everything is computed by the functions in `reference/positions.py`, on the shipped model and
# on the shapes of published models.

# %%
import matplotlib.pyplot as plt
import numpy as np

import slimllm
from slimllm.reference import kv_cache
from slimllm.reference.attention import attention_bias
from slimllm.reference.model import forward, tracing
from slimllm.reference.ops import linear
from slimllm.reference.positions import (
    Positions,
    advance,
    alibi_slopes,
    apply_rope,
    apply_rope2d,
    inv_freq,
    logn_scale,
    ntk_alpha,
    positions_for,
    rope_angles,
    start_state,
)
from slimllm.weights.families import detect

model = slimllm.load(slimllm.SHIPPED_MODEL)
cfg, params, tok = model.cfg, model.params, model.tokenizer


def config_of(hf: dict):
    """The ModelConfig slimllm's loader makes from a published config.json."""
    return detect(hf).config_from_hf(hf)


def at(ids) -> Positions:
    """Positions of one sequence whose tokens sit at the given position ids."""
    ids = np.asarray(ids)[None]  # [t] -> [b,t], b = 1
    return Positions(slots=ids, ids=ids, prefix=np.zeros(1, int), ntk_alpha=np.ones(1, np.float32))


# %% [markdown]
# ## RoPE: a rotation per pair of dimensions
#
# Rotary position embedding (RoPE, Su et al. 2021) cuts each head's `d` dimensions into `d/2`
# pairs and rotates pair `j` of a query or key at position `p` by the angle
#
# $$\theta_j(p) = p \cdot \omega_j, \qquad \omega_j = \text{base}^{-2j/d},\quad
#   j = 0, \dots, d/2 - 1.$$
#
# Llama pairs dimension `j` with `j + d/2` ("rotate-half"); some models pair neighbours
# `(2j, 2j+1)` (`rope_style="interleaved"`). The frequencies `ω_j` run from 1 radian per
# position (pair 0) down to almost `1/base`: `positions.inv_freq` computes them.
#
# Below, one real query vector of the shipped model (head 0 of layer 0, before RoPE) is placed
# at positions 0, 1, ..., 47. Each panel shows one pair of its coordinates: every position
# moves the point along a circle, by `ω_j` radians. Pair 0 turns fast, the last pair barely
# moves; a rotation never changes a vector's length.

# %%
ids = tok.encode("Return a new sorted list from the items in iterable.")
state = start_state(cfg, [ids])
with tracing() as trace:
    forward(params, cfg, np.array([ids]), kv_cache.init_cache(cfg, 1, len(ids)), state)
t, h, k, d = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
layer = params.layers[0]
q_raw = linear(trace["layers.0.attn_in"], layer.wq).reshape(1, t, h, d)  # before RoPE
k_raw = linear(trace["layers.0.attn_in"], layer.wk).reshape(1, t, k, d)
pos = positions_for(cfg, state, t)  # positions 0..t-1 of this prompt
print("trace's q is q_raw rotated:", np.allclose(apply_rope(q_raw, cfg, pos), trace["layers.0.q"]))
print("frequencies ω_j:", inv_freq(cfg).shape, inv_freq(cfg)[[0, 1, -1]])

# %%
n = 48
q_vec = q_raw[0, 3, 0]  # [d]: token 3, head 0
rotated = apply_rope(np.broadcast_to(q_vec, (1, n, 1, d)), cfg, at(np.arange(n)))[0, :, 0]  # [n,d]
print("norm at every position:", np.ptp(np.linalg.norm(rotated, axis=-1)) < 1e-5)

fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
circle = np.linspace(0, 2 * np.pi, 200)
for ax, j in zip(axes, (0, 3, 6, d // 2 - 1)):
    x, y = rotated[:, j], rotated[:, j + d // 2]
    radius = np.hypot(x[0], y[0])
    ax.plot(radius * np.cos(circle), radius * np.sin(circle), color="lightgray", zorder=0)
    dots = ax.scatter(x, y, c=np.arange(n), cmap="viridis", s=18)
    ax.set_aspect("equal")
    ax.set_title(f"pair {j}: dims ({j}, {j + d // 2})\nω = {inv_freq(cfg)[j]:.2g} rad/position")
fig.colorbar(dots, ax=axes, label="position")
plt.show()

# %% [markdown]
# ## Angles per dimension
#
# Pair `j` completes a turn every `2π/ω_j` positions, its *wavelength*. Left: `cos θ_j(p)` for
# every position of the shipped model's context (`rope_angles`, the function `apply_rope`
# uses); fast pairs oscillate, slow pairs hardly change over 256 positions. Right: the
# wavelengths of the shipped model (`d = 32`, base 10⁴) and of Llama-3-8B (`d = 128`, base
# 5·10⁵), from their configs, against each model's context length. Pairs whose wavelength is
# longer than the context never complete a turn during training: they carry coarse position,
# or none at all, and are the pairs the long-context methods below change.

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
llama3 = config_of(LLAMA3_8B)

cos, _ = rope_angles(cfg, np.arange(cfg.max_len)[None], np.ones(1))  # [b,t,d/2]
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
image = left.imshow(cos[0].T, aspect="auto", cmap="RdBu", origin="lower")
left.set_xlabel("position p")
left.set_ylabel("pair j")
left.set_title("shipped model: cos θ_j(p)")
fig.colorbar(image, ax=left)
for name, c in (("shipped model", cfg), ("Llama-3-8B", llama3)):
    freqs = inv_freq(c)
    line = right.semilogy(np.arange(freqs.size) / freqs.size, 2 * np.pi / freqs, label=name)
    right.axhline(c.max_len, color=line[0].get_color(), linestyle="--", linewidth=1)
right.set_xlabel("pair j / (d/2)")
right.set_ylabel("wavelength 2π/ω_j (positions)")
right.set_title("wavelengths; dashed: each model's context")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Why rotations: scores depend on distance only
#
# A rotation by `θ(m)` followed by the transpose of a rotation by `θ(n)` is a rotation by
# `θ(n) − θ(m)`. So the attention score of a query at position `m` with a key at position `n`,
#
# $$\langle R(m)\,q,\; R(n)\,k\rangle = \langle q,\; R(n-m)\,k\rangle,$$
#
# depends on the vectors and on the *offset* `n − m`, never on where the pair sits. Left: the
# score of one query and one key of the shipped model (layer 0, head 0 and the kv head it
# reads), each rotated to every position 0..63: it is constant along every diagonal. Right:
# the score as a function of the distance `m − n` for the same token pair in the four query
# heads that share kv head 0. Each curve is a sum of `d/2` sinusoids, one per pair, with
# amplitudes and phases set by `q` and `k`: the fast pairs make it wiggle from one position to
# the next, the slow pairs set its trend over long distances. Training shapes `q` and `k`, and
# so how each head's scores change with distance.

# %%
n = 64
q_vec, k_vec = q_raw[0, 3, 0], k_raw[0, 2, 0]  # [d] each: query token 3, key token 2
qs = apply_rope(np.broadcast_to(q_vec, (1, n, 1, d)), cfg, at(np.arange(n)))[0, :, 0]  # [n,d]
ks = apply_rope(np.broadcast_to(k_vec, (1, n, 1, d)), cfg, at(np.arange(n)))[0, :, 0]
scores = qs @ ks.T / np.sqrt(d)  # [m,n]
print("constant along diagonals:", np.allclose(np.diag(scores, -5), scores[5, 0], atol=1e-4))

dist = np.arange(cfg.max_len)
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
image = left.imshow(scores, cmap="RdBu_r", origin="lower")
left.set_xlabel("key position n")
left.set_ylabel("query position m")
left.set_title("score ⟨R(m)q, R(n)k⟩/√d")
fig.colorbar(image, ax=left)
for head in range(cfg.n_rep):  # query heads 0..g-1 read kv head 0
    q_at = np.broadcast_to(q_raw[0, 3, head], (1, dist.size, 1, d))  # query at m = distance
    score = apply_rope(q_at, cfg, at(dist))[0, :, 0] @ k_vec / np.sqrt(d)  # key at 0: R(0) = I
    right.plot(dist, score, linewidth=1, label=f"head {head}")
right.set_xlabel("distance m − n (key at 0, query at m)")
right.set_ylabel("score")
right.set_title("one token pair, the heads of kv head 0")
right.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Longer contexts, part 1: wavelength scaling (Llama-3.1)
#
# Llama-3.1 was trained at 8192 tokens and then extended to 128K. Its config adds a
# `rope_scaling` block; slimllm's loader turns it into a `WavelengthScaling` and `inv_freq`
# applies it. With `L` the original context, the rule sorts the pairs by wavelength `λ`:
#
# - `λ < L / high_freq_factor`: short wavelengths, unchanged (local word order keeps working);
# - `λ > L / low_freq_factor`: long wavelengths, slowed down by `factor` (positions 8x further
#   apart look like the positions seen in training);
# - between: a smooth blend of the two.
#
# The figure compares the wavelengths of Llama-3-8B and Llama-3.1-8B pair by pair.

# %%
LLAMA31_8B = {
    **LLAMA3_8B,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
llama31 = config_of(LLAMA31_8B)
scaling = llama31.rope_scaling
print(scaling)
before, after = 2 * np.pi / inv_freq(llama3), 2 * np.pi / inv_freq(llama31)

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
left.semilogy(before, label="Llama-3-8B")
left.semilogy(after, label="Llama-3.1-8B", linestyle="--")
for factor in (scaling.low_freq_factor, scaling.high_freq_factor):
    left.axhline(scaling.original_len / factor, color="gray", linewidth=0.8, linestyle=":")
left.set_xlabel("pair j")
left.set_ylabel("wavelength (positions)")
left.set_title("dotted: L/low_freq_factor and L/high_freq_factor")
left.legend()
right.plot(after / before)
right.set_xlabel("pair j")
right.set_ylabel("wavelength after / before")
right.set_title(f"stretch per pair (factor {scaling.factor:g})")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Longer contexts, part 2: dynamic NTK (Qwen)
#
# Qwen (v1) stretches RoPE only when a prompt is longer than its training length `T`, and by
# how much depends on the prompt. `positions.ntk_alpha` gives the factor
# `α = 2^⌈log2(len/T) + 1⌉ − 1` (1 up to `T`, then 3, 7, 15, ...), fixed for the whole
# sequence when the prompt arrives (`start_state` reads it off each prompt). The base becomes
# `base · α^{d/(d−2)}`, which leaves pair 0 alone and slows the last pair by exactly `α`, with
# a geometric blend between ("NTK-aware" scaling).
#
# Qwen also scales queries past `T` by `log_T(p + 1)` (*logN attention*, `logn_scale`), so the
# softmax does not flatten as the number of keys grows. The figure shows all three: `α`
# against the prompt length, the wavelengths for several `α`, and the query scale.

# %%
QWEN_7B = {  # Qwen-7B's config.json (the fields the loader reads)
    "architectures": ["QWenLMHeadModel"],
    "model_type": "qwen",
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 151936,
    "seq_length": 8192,
    "max_position_embeddings": 32768,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "scale_attn_weights": True,
    "layer_norm_epsilon": 1e-6,
}
qwen = config_of(QWEN_7B)
trained = qwen.rope_scaling.trained_len
print(qwen.rope_scaling, "logN from position", qwen.logn_len)
print("α of a 20000-token prompt:", start_state(qwen, [[0] * 20000]).ntk_alpha)

lengths = np.unique(np.geomspace(1, 16 * trained, 400).astype(int))
p = np.arange(4 * trained)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
axes[0].step(lengths, [ntk_alpha(int(n), trained) for n in lengths], where="post")
axes[0].axvline(trained, color="gray", linestyle=":")
axes[0].set_xscale("log")
axes[0].set_xlabel("prompt length")
axes[0].set_ylabel("α")
axes[0].set_title(f"ntk_alpha (dotted: T = {trained})")
for alpha in (1, 3, 7, 15):
    axes[1].semilogy(2 * np.pi / inv_freq(qwen, alpha), label=f"α = {alpha}")
axes[1].set_xlabel("pair j")
axes[1].set_ylabel("wavelength (positions)")
axes[1].set_title("wavelengths with the stretched base")
axes[1].legend()
axes[2].plot(p, logn_scale(qwen, at(p))[0])
axes[2].set_xlabel("query position")
axes[2].set_ylabel("query scale")
axes[2].set_title("logN attention")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## ALiBi: a penalty per head instead of a rotation
#
# ALiBi (Press et al. 2022; Baichuan-13B uses it) adds nothing to queries or keys. It adds
# `slope_h · (n − m)` to every attention score, a penalty linear in the distance, with one
# slope per head from a geometric sequence: head `h` of `p` (a power of two) gets
# `2^{−8(h+1)/p}`. When the head count is not a power of two, as Baichuan-13B's 40, the first
# 32 heads take the sequence for 32 and the other 8 take every other slope of the sequence for
# 64, which falls between them (`positions.alibi_slopes`).
#
# Steep heads see only the last few tokens; the flattest see the whole context almost
# unpenalised. (Upstream adds `slope_h · n`; slimllm's `slope_h · (n − m)` differs by a
# constant per query row, which the softmax ignores, and keeps the numbers small.) The right
# panel is the bias row of one query at position 63, straight from `attention_bias` (chapter 3
# shows the whole matrix).

# %%
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
slopes = alibi_slopes(baichuan.n_heads)
print(f"pos={baichuan.pos!r}, {baichuan.n_heads} heads")
print(f"slopes from {slopes.max():.3g} down to {slopes.min():.3g}")
bias = attention_bias(baichuan, at([63]), 64)[0, :, 0]  # [h,s]: query at slot 63, keys 0..63

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
heads = np.arange(baichuan.n_heads)
left.semilogy(heads[:32], slopes[:32], "o", label="heads 0-31: sequence for 32")
left.semilogy(heads[32:], slopes[32:], "s", label="heads 32-39: in between")
left.set_xlabel("head")
left.set_ylabel("slope")
left.set_title("Baichuan-13B's ALiBi slopes")
left.legend()
for head in sorted((0, 7, 15, 31, 32, 39), key=lambda head: -slopes[head]):
    right.plot(np.arange(64), bias[head], label=f"head {head} (slope {slopes[head]:.2g})")
right.set_xlabel("key position n (query at 63)")
right.set_ylabel("bias added to the score")
right.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2-D RoPE (ChatGLM-6B)
#
# ChatGLM-6B is a *prefix LM*: the prompt ends with a mask token `[gMASK]` and the token
# `<sop>` that opens the generated block. Every token gets two position ids
# (`positions_for` with `pos="rope2d"`):
#
# - the first is the token's slot in the prompt; from `<sop>` on (the generated block) it
#   stays fixed at the index of `[gMASK]`, the place the answer fills;
# - the second is 0 in the prompt and counts 1, 2, 3, ... inside the block, from `<sop>`.
#
# `apply_rope2d` rotates the first half of each head by the first id and the second half by
# the second id, each with ordinary RoPE over `d/2` dims. The ids below are made by the same
# calls generation makes: `start_state` on the prompt, `positions_for` for the prompt, then one
# `advance` and `positions_for` per generated token.

# %%
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
gmask, sop = CHATGLM_6B["gmask_token_id"], glm.block_start_id
prompt = [5, 6, 7, 8, 9, 10, gmask, sop]  # six text tokens, [gMASK], <sop>
state = start_state(glm, [prompt])
ids2d = [positions_for(glm, state, len(prompt)).ids[0]]  # [t,2]
state = advance(state, len(prompt))
for _ in range(5):  # five generated tokens, one at a time
    ids2d.append(positions_for(glm, state, 1).ids[0])
    state = advance(state, 1)
ids2d = np.concatenate(ids2d)  # [slots, 2]
labels = ["text"] * 6 + ["[gMASK]", "<sop>"] + [f"gen {i}" for i in range(1, 6)]
for slot, (label, (p1, p2)) in enumerate(zip(labels, ids2d)):
    print(f"slot {slot:2d} {label:8s} position id {p1:2d}  block id {p2}")
print("prefix (keys every query sees, chapter 3):", state.prefix)

# %%
slots = np.arange(len(ids2d))
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.step(slots, ids2d[:, 0], where="mid", marker="o", label="position id (first half of a head)")
ax.step(slots, ids2d[:, 1], where="mid", marker="s", label="block id (second half)")
ax.set_xticks(slots, labels, rotation=60)
ax.set_ylabel("id")
ax.set_title("ChatGLM-6B's two position ids per token")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The check below applies `apply_rope2d` to random vectors of ChatGLM-6B's head size and
# compares each half with ordinary RoPE (`apply_rope`, which rotates `rotary_dim = d/2` dims
# for this config) at that half's id.

# %%
half = glm.head_dim // 2
x = np.random.default_rng(0).standard_normal((1, len(slots), 1, glm.head_dim)).astype(np.float32)
pos2d = Positions(slots[None], ids2d[None], state.prefix, state.ntk_alpha)
out = apply_rope2d(x, glm, pos2d)  # [b,t,n,d]
first = apply_rope(x[..., :half], glm, at(ids2d[:, 0]))  # [b,t,n,d/2]
second = apply_rope(x[..., half:], glm, at(ids2d[:, 1]))
print("first half  == RoPE at the position id:", np.allclose(out[..., :half], first))
print("second half == RoPE at the block id:   ", np.allclose(out[..., half:], second))

# %% [markdown]
# ChatGLM2/3 and GLM-4 dropped the second id: they rotate only the first half of each head
# (`rope_fraction=0.5`), with interleaved pairs (`rope_style="interleaved"`), and leave the
# other half without position. Both are config values, not new code:

# %%
CHATGLM2_6B = {  # THUDM/chatglm2-6b's config.json
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "num_layers": 28,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "padded_vocab_size": 65024,
    "seq_length": 32768,
    "layernorm_epsilon": 1e-5,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "rmsnorm": True,
    "original_rope": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
}
glm2 = config_of(CHATGLM2_6B)
print(f"pos={glm2.pos!r}, style={glm2.rope_style!r}")
print(f"rotates {glm2.rotary_dim} of each head's {glm2.head_dim} dims")

# %% [markdown]
# ## What to try
#
# - Set `rope_style="interleaved"` with `cfg.replace(...)` and redraw the rotation figure:
#   which coordinates form each pair now?
# - Change `rope_theta` of the shipped config and watch the wavelength plot: what does a
#   larger base do to the slowest pairs?
# - Give Llama-3.1's scaling a `factor` of 2 or 32 and see which band of pairs moves.
# - Compute `alibi_slopes(n)` for `n` = 8, 12 and 64 and check where the extra heads fall.
# - In the 2-D RoPE cell, put `[gMASK]` in the middle of the text (`ChatGLM`'s blank
#   infilling): which position id do the generated tokens get?
