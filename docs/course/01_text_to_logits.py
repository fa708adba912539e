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
# # 1. From text to logits
#
# This chapter follows one sentence through one forward pass of slimllm's NumPy reference on
# the small model slimllm ships: text becomes token ids, ids become vectors, four transformer
# blocks update those vectors, and the last step turns each vector into one score (a *logit*)
# for every entry of the vocabulary. Every array's shape is printed on the way, and the last
# figures show how the vectors grow and what they predict as they pass through the layers.

# %%
import matplotlib.pyplot as plt
import numpy as np

import slimllm
from slimllm.reference import kv_cache, positions
from slimllm.reference.model import forward, norm, tracing, unembed
from slimllm.reference.ops import log_softmax, rms_norm, softmax
from slimllm.reference.weight_format import widen
from slimllm.train import held_out_documents

# %% [markdown]
# ## The model
#
# `slimllm.load` reads a Hugging Face checkpoint directory: `config.json` becomes a frozen
# `ModelConfig` (the architecture, nothing about how we run it), `model.safetensors` becomes
# the weights (`model.params`, a `Params` dataclass with the same names for every family) and
# `tokenizer.json` the tokenizer. The shipped model is a small Llama trained on the Python
# standard library's documentation.

# %%
model = slimllm.load(slimllm.SHIPPED_MODEL)
cfg, params, tok = model.cfg, model.params, model.tokenizer
print(f"{cfg.n_params():,} parameters, weights stored as {model.weights}")
print(cfg)

# %% [markdown]
# The code names every axis with one letter, and every line that changes a shape says so in a
# comment. The letters, with this model's sizes:

# %%
legend = {
    "b batch": 1,
    "t query positions": "the prompt length",
    "e model width": cfg.width,
    "h query heads": cfg.n_heads,
    "k key/value heads": cfg.n_kv_heads,
    "g query heads per kv head": cfg.n_rep,
    "d head dim": cfg.head_dim,
    "f MLP width": cfg.ffn_width,
    "v vocabulary": cfg.vocab,
}
for name, value in legend.items():
    print(f"{name:28s} {value}")
print(f"layers: {cfg.n_layers}, longest sequence: {cfg.max_len} tokens")

# %% [markdown]
# ## Text to token ids
#
# The tokenizer is a byte-level BPE: it splits text into pieces from a vocabulary of 4096
# (whole common words, fragments of rare ones, single bytes as a last resort) and prefixes the
# id of `<s>`, the token every training document started with. A leading space belongs to the
# piece that follows it (the tokenizer's own pieces write it as `Ġ`).

# %%
text = "Return a new sorted list from the items in"
ids = tok.encode(text)
for i in ids:
    print(f"{i:5d}  {tok.id_to_piece(i)!r:14s} {tok.decode([i])!r}")

# %% [markdown]
# ## One forward pass
#
# Besides the weights and the tokens `[b,t]`, a forward call takes two things:
#
# - a `SeqState` saying where the new tokens go: here the start of an empty sequence, so
#   their positions are 0, 1, ..., t-1;
# - a KV cache (chapter 4) with room for the tokens: attention writes each layer's keys and
#   values into it and reads them back.
#
# The same `forward` runs a whole prompt (prefill) or one new token (decode); there is no
# other path.
# `tracing()` keeps the named intermediate arrays the forward computes, in the order it
# computes them, so we can look inside without changing any code.

# %%
tokens = np.array([ids])  # [b,t] with b = 1
state = positions.start_state(cfg, [ids])
cache = kv_cache.init_cache(cfg, batch=1, max_len=len(ids))
with tracing() as trace:
    logits, cache = forward(params, cfg, tokens, cache, state)

print(f"tokens {tokens.shape} -> logits {logits.shape}")
for name, x in trace.items():
    print(f"{name:20s} {str(x.shape):18s} {x.dtype}")

# %% [markdown]
# ## Step by step
#
# **Embedding.** Each id picks one row of the embedding table `[v, e]`. The weights stay in
# the checkpoint's storage format (`model.weights`, printed above); every use first *widens*
# them to float32, so all arithmetic is float32.

# %%
table = widen(params.embed)  # [v,e] float32
print("embedding table", table.shape)
print("embed == table rows:", np.array_equal(trace["embed"][0], table[ids]))

# %% [markdown]
# **A block.** Llama is *pre-norm*: the running vector `x` (the *residual stream*) is never
# overwritten. Each sublayer reads an RMS-normalised copy, `x / rms(x) * w`, and its output is
# *added* to the stream:
#
# $$\text{mid} = x + \text{attn}(\text{norm}(x)), \qquad
#   \text{out} = \text{mid} + \text{mlp}(\text{norm}(\text{mid})).$$
#
# Attention projects the normed vector to 8 query heads but only 2 key/value heads of 32
# dims (grouped-query attention, chapter 3): that is why `q` is `[b,t,8,32]` and `k`, `v` are
# `[b,t,2,32]`. The output projection brings the 8 heads' results back to width `e`.
# The checks below rebuild layer 0's input and output from the traced pieces.

# %%
layer = params.layers[0]
x = trace["embed"]  # [b,t,e]
attn_in = norm(x, layer.attn_norm, layer.attn_norm_b, cfg)  # RMSNorm for this config
print("attn_in == norm(embed):", np.allclose(attn_in, trace["layers.0.attn_in"]))
by_hand = rms_norm(x, layer.attn_norm, None, cfg.norm_eps)  # x / rms(x) * w
print("rms_norm is that norm: ", np.allclose(attn_in, by_hand))
rebuilt = x + trace["layers.0.attn_out"] + trace["layers.0.mlp_out"]  # [b,t,e]
print("out == x + attn + mlp: ", np.allclose(rebuilt, trace["layers.0.out"], atol=1e-5))

# %% [markdown]
# **The head.** After the last block a final RMSNorm and one matrix `[e, v]` turn each
# position's vector into `v` logits. This model *ties* its head to the embedding table: the
# logit of token `j` is the dot product of the normed vector with row `j` of the table.

# %%
tied = trace["final_norm"] @ table.T  # [b,t,e] @ [e,v] -> [b,t,v]
print("tied head:", cfg.tied_head, "| logits == final_norm @ embedᵀ:", np.allclose(tied, logits))

# %% [markdown]
# ## What the logits say
#
# The logits at position `i` score every candidate for token `i + 1`; a softmax turns them
# into probabilities. Training lowered the *cross-entropy*, the mean of `-log p(actual next
# token)`. Its exponential is the *perplexity*: a perplexity of 20 means the model is, on
# average, as unsure as if it picked among 20 equally likely tokens. Below, for every
# position, the token the model ranks first and the probability it gives the token that
# really follows.

# %%
logp = log_softmax(logits[0])  # [t,v]
for i in range(len(ids) - 1):
    guess, actual = tok.decode([int(logp[i].argmax())]), tok.decode([ids[i + 1]])
    p_actual = np.exp(logp[i, ids[i + 1]])
    print(f"{tok.decode([ids[i]])!r:10s} top guess {guess!r:12s} p({actual!r}) = {p_actual:.2g}")
nll = -logp[np.arange(len(ids) - 1), ids[1:]]
print(f"cross-entropy {nll.mean():.2f} nats/token, perplexity {np.exp(nll.mean()):.1f}")

# %% [markdown]
# The distribution after the last token is what generation samples from (greedy decoding takes
# its most likely token). A trained model puts most of its mass on a few continuations that
# fit the sentence, here words that can follow "the items in"; an untrained one spreads it
# almost evenly over the whole vocabulary.

# %%
p = softmax(logits[0, -1])  # [v]
top = np.argsort(p)[::-1][:12]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.barh([repr(tok.decode([int(j)])) for j in top][::-1], p[top][::-1])
ax.set_xlabel("probability")
ax.set_title(f"next token after {text!r}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The residual stream through the layers
#
# Because every sublayer *adds* to the stream, its size can only be kept in check by what the
# sublayers choose to add. We run a longer piece of real text (the start of a held-out
# document the model never trained on) and measure the root-mean-square of each token's
# vector after the embedding and after each block, and the RMS of what each attention and MLP
# sublayer added. The sublayers never see this growth: each reads a normalised copy.
#
# What to look for: how small the embeddings are next to what the blocks write (which
# sublayer of block 0 writes most of it?); how the stream keeps growing with depth; and
# whether the first token, `<s>`, follows the other tokens or goes its own way (in large
# models it often carries a much larger norm: many heads use it as a place to put attention
# they do not need, see chapter 3).

# %%
doc_ids = tok.encode(held_out_documents(slimllm.SHIPPED_MODEL)[0])[:128]
state = positions.start_state(cfg, [doc_ids])
cache = kv_cache.init_cache(cfg, batch=1, max_len=len(doc_ids))
with tracing() as doc:
    doc_logits, _ = forward(params, cfg, np.array([doc_ids]), cache, state)


def rms(x):
    """Root-mean-square over the width: [b,t,e] -> [t]."""
    return np.sqrt(np.mean(x[0] ** 2, axis=-1))


stages = ["embed"] + [f"layers.{i}.out" for i in range(cfg.n_layers)]
stream = np.stack([rms(doc[name]) for name in stages])  # [stages, t]
print("residual stream RMS per stage (mean over tokens):", np.round(stream.mean(axis=1), 3))

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
depth = np.arange(len(stages))
left.plot(depth, stream[:, 1:], color="tab:blue", alpha=0.15, linewidth=0.8)
left.plot(depth, stream[:, 0], color="tab:red", marker="o", label="token 0 (<s>)")
left.plot(depth, np.median(stream[:, 1:], axis=1), color="black", marker="o", label="median")
left.set_xticks(depth, ["embed"] + [f"block {i}" for i in range(cfg.n_layers)])
left.set_yscale("log")
left.set_ylabel("RMS of the residual stream")
left.set_title(f"each of {len(doc_ids)} tokens of held-out text")
left.legend()
width = 0.38
layers = np.arange(cfg.n_layers)
for shift, part in ((-width / 2, "attn_out"), (width / 2, "mlp_out")):
    added = [np.median(rms(doc[f"layers.{i}.{part}"])) for i in layers]
    right.bar(layers + shift, added, width, label=part)
right.set_xticks(layers, [f"block {i}" for i in layers])
right.set_ylabel("median RMS of what the sublayer adds")
right.set_title("attention and MLP contributions")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the stream early (the "logit lens")
#
# The final norm and the head can be applied to the stream after *any* block, not just the
# last: `unembed` is the same function `forward` ends with. This asks what the model would
# predict if it stopped early. The figure shows, after each stage, the mean log-probability
# the early read-out gives the actual next token of the held-out text. In a trained model it
# climbs with depth: each block refines the prediction, and the last block's read-out is the
# model's own answer (the rightmost point equals the real logits' score). The first point can
# lie far *below* a uniform guess: with a head tied to the embedding table, reading the
# embedding back mostly predicts the current token again, which is rarely the next one.

# %%
targets = np.array(doc_ids[1:])
rows = np.arange(len(targets))
lens = []
for name in stages:
    early = unembed(params, cfg, doc[name])[0, :-1]  # [t-1,v]
    lens.append(log_softmax(early)[rows, targets].mean())
final = log_softmax(doc_logits[0, :-1])[rows, targets].mean()
print(f"real logits: {final:.3f}, last stage's read-out: {lens[-1]:.3f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(depth, lens, marker="o")
ax.axhline(-np.log(cfg.vocab), color="gray", linestyle="--", label="uniform guess, -log v")
ax.set_xticks(depth, ["embed"] + [f"block {i}" for i in range(cfg.n_layers)])
ax.set_ylabel("mean log p(actual next token)")
ax.set_title("predictions read from the stream after each stage")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What to try
#
# - Change `text` to a sentence from the Python documentation you know, and one that has
#   nothing to do with Python: compare the perplexities.
# - Print `trace["layers.3.q"][0, -1]`: one vector per query head. Which parts of the traced
#   arrays change when you change only the last word?
# - Skip a block: call `forward` with `dataclasses.replace(params, layers=params.layers[:3])`
#   and `cfg.replace(n_layers=3)`, and compare the logits with the logit lens's read-out after
#   block 2.
# - Read `reference/model.py` top to bottom: it is about 200 lines, and every name you met
#   here (`embed`, `block`, `attention_block`, `unembed`) is a function there.
