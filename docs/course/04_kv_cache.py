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
# # 4. The KV cache
#
# A decoder generates one token at a time, and every new token attends to all the tokens
# before it. Their keys and values do not change once computed, so they are kept: the *KV
# cache*. This chapter shows what slimllm stores, how much memory that takes for real models
# as the context and the batch grow, and the INT8 cache of the paper slimllm implements (one
# scale per token per head): its quantiser, its errors, and what those errors do to the
# shipped model's predictions on real text, next to the 16-bit caches.

# %%
import matplotlib.pyplot as plt
import numpy as np

import slimllm
from slimllm.evaluate import format_memory, memory_report, sequence_logits
from slimllm.reference import kv_cache
from slimllm.reference.model import forward, tracing
from slimllm.reference.ops import log_softmax
from slimllm.reference.positions import start_state
from slimllm.reference.quant import dequantize, quantize
from slimllm.reference.runtime import Runtime
from slimllm.train import held_out_documents
from slimllm.weights.families import detect

model = slimllm.load(slimllm.SHIPPED_MODEL)
cfg, params, tok = model.cfg, model.params, model.tokenizer


def config_of(hf: dict):
    """The ModelConfig slimllm's loader makes from a published config.json."""
    return detect(hf).config_from_hf(hf)


# %% [markdown]
# ## What is stored
#
# For every layer, the cache holds the keys and values of every kv head at every position:
# two arrays `[b, k, s, d]` per layer, allocated once for the longest sequence (`s` slots).
# Keys are stored *after* RoPE: a key's rotation depends only on its own position, so it never
# has to be redone. Queries are not stored: only the new tokens' queries are ever needed.
#
# `init_cache` allocates; each forward writes the new tokens' K and V at their slots
# (`kv_cache.write` returns a new cache, the reference never mutates one) and attention then
# reads the layer back. Below, a short prompt in a cache of 16 slots.

# %%
ids = tok.encode("Return a new sorted list from the items in iterable.")
t = len(ids)
cache = kv_cache.init_cache(cfg, batch=1, max_len=16)
with tracing() as trace:
    _, cache = forward(params, cfg, np.array([ids]), cache, start_state(cfg, [ids]))

print(f"{cfg.n_layers} layers x (K, V), each {cache.k[0].shape} [b,k,s,d] {cache.k[0].dtype}")
stored_k = cache.k[0][0].transpose(1, 0, 2)  # [k,s,d] -> [s,k,d]
same = np.array_equal(stored_k[:t], trace["layers.0.k"][0])
print("slots 0..t-1 hold layer 0's keys after RoPE:", same)
print("slots t..15 are still empty:", not cache.k[0][0, :, t:].any())

# %% [markdown]
# The cost of one token is `2 (K and V) × layers × kv heads × d` values. The storage formats
# are entries of `kv_cache.KV_FORMATS`: float32, float16, bfloat16 and int8, where int8 adds a
# float32 scale per vector (per token, per kv head, for K and for V). With this model's small
# heads (`d = 32`) the scales cost 4 bytes per 32: int8 is a bit more than half of a 16-bit
# cache. With `d = 128` (most large models) it is almost exactly half.

# %%
for fmt in kv_cache.KV_DTYPES:
    per_vector = kv_cache.kv_format(fmt).bytes_per_vector(cfg.head_dim)
    per_token = kv_cache.nbytes_per_token(cfg, fmt)
    print(
        f"{fmt:9s} {per_vector:4d} B per vector, {per_token:6,d} B per token, "
        f"{per_token * cfg.max_len / 2**20:5.2f} MiB for the full {cfg.max_len}-token context"
    )

# %% [markdown]
# ## Memory for real models
#
# The same arithmetic for published models, from their `config.json` values (turned into
# configs by slimllm's own loader), is what `slimllm memory` (formerly `kv-size`) prints;
# `memory_report` is the function behind it. For Llama-3-8B, a context of 8192 and a batch of
# 4 sequences:

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
LLAMA2_7B = {  # Llama-2-7b-hf: multi-head attention, as many kv heads as query heads
    **LLAMA3_8B,
    "intermediate_size": 11008,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
}
QWEN2_7B = {  # Qwen2-7B-Instruct's config.json (the base model has the same shapes)
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
CHATGLM2_6B = {  # THUDM/chatglm2-6b's config.json: 2 kv groups ("multi-query groups")
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
real = {
    "Llama-2-7B": config_of(LLAMA2_7B),
    "Llama-3-8B": config_of(LLAMA3_8B),
    "Qwen2-7B": config_of(QWEN2_7B),
    "ChatGLM2-6B": config_of(CHATGLM2_6B),
}
print(format_memory(memory_report(real["Llama-3-8B"], context=8192, batch=4, weights="bfloat16")))

# %% [markdown]
# Per token, the four models differ by more than their sizes suggest: the cache scales with
# layers × kv heads × d, not with the parameter count. Grouped-query attention (chapter 3) is
# the big lever: Llama-2-7B keeps all 32 heads' keys and values, Llama-3-8B only 8.

# %%
print(
    f"{'model':12s} {'params':>8s} {'layers':>6s} {'kv heads':>8s} {'d':>4s} "
    f"{'bf16 KiB/token':>15s} {'int8 KiB/token':>15s}"
)
for name, c in {**real, "shipped": cfg}.items():
    print(
        f"{name:12s} {c.n_params() / 1e9:7.3g}B {c.n_layers:6d} {c.n_kv_heads:8d} "
        f"{c.head_dim:4d} {kv_cache.nbytes_per_token(c, 'bfloat16') / 1024:15.1f} "
        f"{kv_cache.nbytes_per_token(c, 'int8') / 1024:15.1f}"
    )

# %% [markdown]
# Left: the bfloat16 cache of *one* sequence against its context length, with each model's
# bfloat16 weights as a dashed line of the same colour: past the crossing, one sequence's
# cache outweighs the whole model. Right: Llama-3-8B at a context of 8192, weights plus cache
# against the batch size, for three cache formats. Where a memory budget crosses these lines
# is how many sequences fit: in the memory left after the weights, an int8 cache holds about
# twice as many sequences as a 16-bit one, and four times as many as float32.

# %%
contexts = 2 ** np.arange(8, 18)  # 256 .. 131072 tokens
batches = np.arange(1, 65)
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
for name, c in real.items():
    kv = [memory_report(c, int(n), 1)["dtypes"]["bfloat16"]["total_bytes"] for n in contexts]
    line = left.loglog(contexts, np.array(kv) / 2**30, marker="o", markersize=3, label=name)
    weights = memory_report(c, 1, 1, weights="bfloat16")["weights"]["bytes"]
    left.axhline(weights / 2**30, color=line[0].get_color(), linestyle="--", linewidth=1)
left.set_xscale("log", base=2)
left.set_xlabel("context length (tokens)")
left.set_ylabel("GiB")
left.set_title("bf16 KV cache of one sequence (dashed: bf16 weights)")
left.legend()
llama = real["Llama-3-8B"]
for fmt in ("float32", "bfloat16", "int8"):
    totals = [
        memory_report(llama, 8192, int(b), weights="bfloat16")["totals"][fmt]["bytes"]
        for b in batches
    ]
    right.plot(batches, np.array(totals) / 2**30, label=f"{fmt} cache")
right.set_xlabel("batch (sequences of 8192 tokens)")
right.set_ylabel("GiB (bf16 weights + cache)")
right.set_title("Llama-3-8B: weights + KV cache")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The INT8 quantiser
#
# slimllm's INT8 cache follows the paper (PAPER.md, section 3): each vector of `d` values (one
# token, one kv head, K or V) gets its own scale,
#
# $$\text{scale} = \frac{\max_i |x_i|}{127}, \qquad
#   q_i = \text{round}\!\left(\frac{x_i}{\text{scale}}\right) \in [-127, 127], \qquad
#   \hat x_i = q_i \cdot \text{scale},$$
#
# symmetric (no zero point), rounding half to even. The largest value of each vector is
# stored exactly and every value's error is at most half a step, `scale/2`. Keys are
# quantised after RoPE, because the cache stores what attention reads.
#
# Here is `quant.quantize` on one real key vector of the shipped model:

# %%
text_ids = tok.encode(held_out_documents(slimllm.SHIPPED_MODEL)[0])[: cfg.max_len]
n = len(text_ids)
tokens, state = np.array([text_ids]), start_state(cfg, [text_ids])
with tracing() as doc:
    forward(params, cfg, tokens, kv_cache.init_cache(cfg, 1, n), state)
keys = np.stack([doc[f"layers.{i}.k"][0] for i in range(cfg.n_layers)])  # [layers,s,k,d]
values = np.stack([doc[f"layers.{i}.v"][0] for i in range(cfg.n_layers)])

x = keys[0, 10, 0]  # layer 0, token 10, kv head 0: [d]
q, scale = quantize(x)
print("x       ", np.round(x[:8], 3), "...")
print("q (int8)", q[:8], "...  scale", scale, "= max|x|/127 =", np.abs(x).max() / 127)
print("q*scale ", np.round(dequantize(q, scale)[:8], 3), "...")
print("largest error", np.abs(x - dequantize(q, scale)).max(), "<= scale/2 =", scale / 2)

# %% [markdown]
# The cache itself does exactly this on every write: an int8 cache holds int8 values and a
# float32 scale array `[b,k,s]` per layer beside them. (Layer 0 is compared because its keys
# do not depend on the cache; later layers' inputs already differ slightly, since layer 0's
# attention read the quantised cache.)

# %%
_, int8_cache = forward(params, cfg, tokens, kv_cache.init_cache(cfg, 1, n, "int8"), state)
k8, k8_scale = int8_cache.k[0], int8_cache.k_scale[0]  # layer 0: [b,k,s,d], [b,k,s]
print(f"layer 0 keys: values {k8.shape} {k8.dtype}, scales {k8_scale.shape} {k8_scale.dtype}")
same = np.array_equal(k8[0, 0, 10], q) and k8_scale[0, 0, 10] == scale
print("slot 10 of kv head 0 holds quantize(x):", same)

# %% [markdown]
# How attention reads it: the definition, `naive_attention`, dequantises the layer's cache
# whole (it is the spec, not the fast path). SlimAttention and the flash baseline never build
# a float copy: they multiply the queries with the int8 keys as they are and apply each key's
# scale to its column of scores, `scores[i, j] = scale_K[j] · Σ_c q[i, c] · qK[j, c]`, and
# fold each value's scale into the probabilities before the product with the int8 values
# (`reference/key_blocks.py`, the paper's "hybrid" matmuls).
#
# ### Why one scale per token
#
# A single scale for a whole tensor would be set by its largest value anywhere, and every
# small vector would be rounded to a handful of levels. The figure shows the scales of the
# shipped model's keys and values on held-out text, token by token, for every layer and kv
# head. What to look for: scales that differ between layers and heads by large factors, and
# from token to token by smaller ones, with occasional outliers. A shared scale would be set
# by the largest of them; per token, each vector gets a step that fits it.

# %%
k_scales = np.abs(keys).max(-1) / 127  # [layers,s,k]: what quantize computes
v_scales = np.abs(values).max(-1) / 127
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), sharey=True, layout="constrained")
for ax, (name, scales) in zip(axes, (("K", k_scales), ("V", v_scales))):
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_kv_heads):
            ax.plot(scales[layer, :, head], linewidth=0.8, label=f"layer {layer}, kv head {head}")
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_title(f"{name} scales, one per token per kv head")
axes[0].set_ylabel("scale = max|x| / 127")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=7)
plt.show()

# %% [markdown]
# ### Error histograms
#
# Left: every K and V value's int8 error in units of its own vector's scale. Rounding to the
# nearest step puts it in `[−½, ½]`, spread evenly; a spike at 0 comes from each vector's
# largest value, which is exact. Right: each vector's relative error `‖x − x̂‖ / ‖x‖` for the
# int8 cache and the two 16-bit caches, each made by the cache's own `encode` and `widen`.
# float16 keeps 10 mantissa bits, bfloat16 7, int8 about 7 bits *relative to the vector's
# largest value*: small values inside a vector lose relatively more.


# %%
def roundtrip(x, fmt):
    """x through a cache format and back: what attention reads."""
    stored, scale = kv_cache.encode(x, fmt)
    wide = kv_cache.kv_format(fmt).widen(stored)
    return wide if scale is None else wide * scale[..., None]


both = np.concatenate([keys, values])  # [2*layers,s,k,d]
q8, s8 = quantize(both)
steps = (both - dequantize(q8, s8)) / s8[..., None]  # error in units of the scale
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
left.hist(steps.ravel(), bins=101, range=(-0.55, 0.55))
left.set_xlabel("(x − x̂) / scale")
left.set_ylabel("values")
left.set_title("int8 error, in steps")
bins = np.geomspace(1e-5, 1e-1, 80)
for fmt in ("float16", "bfloat16", "int8"):
    rel = np.linalg.norm(both - roundtrip(both, fmt), axis=-1) / np.linalg.norm(both, axis=-1)
    right.hist(rel.ravel(), bins=bins, histtype="step", linewidth=1.5, label=fmt)
    print(f"{fmt:9s} median relative error per vector {np.median(rel):.2e}")
right.set_xscale("log")
right.set_xlabel("‖x − x̂‖ / ‖x‖ per vector")
right.set_ylabel("vectors")
right.set_title("relative error of each cached vector")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What the errors do to predictions
#
# Small errors in K and V matter only through what they change downstream. The test is the
# one `slimllm eval --kv-dtype ...` runs: feed the same real text (held-out, never trained
# on) through the model with each cache format, and compare the next-token distributions at
# every position with the float32 cache's, by the KL divergence
# `KL(p₃₂ ‖ p) = Σ p₃₂ log(p₃₂/p)` (0 when they are identical). `evaluate.sequence_logits`
# computes the logits at every position exactly as generation would; here the whole text is
# one prompt, prefilled in one call (attention reads every key and value back from the cache,
# in its format, so this equals feeding the tokens one at a time).
#
# Left: each format against the float32 cache. Right: the int8 cache measured against each
# 16-bit cache, the formats most models are served with. What to look for: the order the
# error histograms predict, float16 closest to float32, then bfloat16, then int8 (for small
# errors KL grows roughly with their square, so a few times the error is ten times the KL or
# more); KL values far too small to change a prediction, so the top-1 token stays the same
# at (almost) every position; and on the right, int8 against either 16-bit cache looks like
# int8 against float32, because the 16-bit caches are so much closer to float32 than int8 is.

# %%
logp = {}
for fmt in ("float32", "float16", "bfloat16", "int8"):
    logits = sequence_logits(model, text_ids, n, Runtime(backend="numpy", kv_dtype=fmt))
    logp[fmt] = log_softmax(logits.astype(np.float64))  # [n,v]


def kl(base, other):
    """KL(base ‖ other) of the next-token distributions at every position: [n]."""
    return np.sum(np.exp(logp[base]) * (logp[base] - logp[other]), axis=-1)


for fmt in ("float16", "bfloat16", "int8"):
    top1 = np.mean(logp[fmt].argmax(-1) == logp["float32"].argmax(-1))
    div = kl("float32", fmt)
    print(f"{fmt:9s} vs float32: KL mean {div.mean():.1e}, max {div.max():.1e}, top-1 {top1:.1%}")

floor = 1e-12  # KL can be exactly 0 (identical logits): drawn at this floor on the log scale
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for fmt in ("float16", "bfloat16", "int8"):
    left.semilogy(np.maximum(kl("float32", fmt), floor), linewidth=0.8, label=fmt)
for base in ("float16", "bfloat16"):
    right.semilogy(np.maximum(kl(base, "int8"), floor), linewidth=0.8, label=f"int8 vs {base}")
left.set_title("KL(float32 cache ‖ format) per position")
right.set_title("KL(16-bit cache ‖ int8 cache) per position")
for ax in (left, right):
    ax.set_xlabel("position in the held-out text")
    ax.legend()
left.set_ylabel("KL (nats)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What to try
#
# - Run `slimllm memory --model slimllm/models/pydoc-llama --context 256 --batch 8` and find
#   its numbers in this chapter; add a model you use to `real` from its `config.json`.
# - Quantise with one scale per *head* for the whole sequence instead of per token
#   (`np.abs(keys).max(axis=(1, 3))`) and compare the error histogram.
# - Run the KL comparison on another held-out document, or on text of your own.
# - `slimllm eval --model slimllm/models/pydoc-llama --kv-dtype int8` adds perplexity and
#   200 greedy tokens compared with the float32 cache.
