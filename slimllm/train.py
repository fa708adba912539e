"""Training the small model slimllm ships: a Llama on the standard library's documentation.

    python -m slimllm.train --out DIR [--steps N] [--tiny]

The model is the project's own JAX forward (`jaxbackend.model.forward`, pure XLA, naive
attention) differentiated with `jax.grad`; the optimiser is AdamW written out below (decoupled
weight decay on matrices only, bias-corrected moments, global-norm clipping, linear warmup then
cosine decay). The tokenizer is a byte-level BPE trained with the `tokenizers` library on the
training documents (`corpus.py`). Everything is seeded: the same settings, Python and library
versions give the same tokenizer and, up to the order of floating-point sums, the same weights.

Training sees the documents as one stream, each `<s> text </s>`, and learns on windows of
`context + 1` tokens drawn at random offsets; held-out perplexity is measured on the held-out
stream cut into consecutive windows the same way (`perplexity`). The output is a normal Hugging
Face Llama directory: config.json, model.safetensors (weights as `dtype`), tokenizer.json,
tokenizer_config.json, generation_config.json, plus training_log.json (settings, data, loss
curve, wall time, perplexities) and heldout.txt (the held-out text perplexity is measured on).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from slimllm import corpus
from slimllm.jaxbackend.kv_cache import init_cache
from slimllm.jaxbackend.model import forward
from slimllm.jaxbackend.params import DeviceLayer
from slimllm.jaxbackend.positions import SeqState
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import SlimllmError
from slimllm.reference.params import Params
from slimllm.reference.runtime import Runtime
from slimllm.weights.families.llama import config_from_hf

BOS, EOS = "<s>", "</s>"
DOC_SEPARATOR = "\n\x1e\n"  # between documents in heldout.txt (ASCII record separator)
XLA = Runtime(kernels="xla")  # differentiable: no compiled kernels in the graph


@dataclass(frozen=True)
class Settings:
    vocab: int = 4096
    width: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 704
    context: int = 256
    batch: int = 16
    steps: int = 1200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"  # how the weights are stored
    log_every: int = 50
    eval_every: int = 200  # held-out perplexity in the curve every this many steps


TINY = Settings(
    vocab=300, width=32, layers=2, heads=4, kv_heads=2, ffn=64, context=32, batch=4, steps=20,
    warmup=5, log_every=5, eval_every=10,
)  # fmt: skip


# ---------------------------------------------------------------- config and tokenizer


def hf_config(s: Settings) -> dict:
    """config.json of the model: a plain LlamaForCausalLM with a tied head."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s.vocab,
        "hidden_size": s.width,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": s.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": s.dtype,
    }


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE of `vocab` tokens (ids 0 and 1 are <s> and </s>; every byte has a
    token, so any text encodes) that prefixes <s> to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tok


def token_stream(encoded: list[list[int]], eos: int) -> np.ndarray:
    """Encoded texts (each <s> and its ids), each followed by </s>, one after the other: [n]."""
    return np.asarray([i for ids in encoded for i in (*ids, eos)], np.int32)


def encode_all(tok, texts: list[str]) -> np.ndarray:
    """The token stream of `texts` with the `tokenizers` tokenizer being trained."""
    return token_stream([enc.ids for enc in tok.encode_batch(texts)], tok.token_to_id(EOS))


# ---------------------------------------------------------------- model and loss


def init_params(cfg: ModelConfig, seed: int) -> Params:
    """GPT-2's initialisation in the device layout ([out, in], q/k/v and gate/up fused): every
    matrix N(0, 0.02^2), the two that write into the residual stream scaled by
    1/sqrt(2 layers), norms at 1."""
    key = jax.random.PRNGKey(seed)
    e, f, d = cfg.width, cfg.ffn_width, cfg.head_dim
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * d
    keys = iter(jax.random.split(key, 1 + 4 * cfg.n_layers))

    def normal(shape, std=0.02):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    layers = tuple(
        DeviceLayer(
            attn_norm=jnp.ones(e),
            wq=None,
            wk=None,
            wv=None,
            w_gate=None,
            w_up=None,
            w_qkv=normal((qkv, e)),  # [(h+2k)d, e]
            wo=normal((e, cfg.n_heads * d), out_std),  # [e, h*d]
            mlp_norm=jnp.ones(e),
            w_gate_up=normal((2 * f, e)),  # [2f, e]
            w_down=normal((e, f), out_std),  # [e, f]
        )
        for _ in range(cfg.n_layers)
    )
    return Params(embed=normal((cfg.vocab, e)), layers=layers, final_norm=jnp.ones(e))


def loss_fn(params: Params, cfg: ModelConfig, windows):
    """Mean cross-entropy of predicting windows[:, 1:] from windows[:, :-1] ([b, t+1] ids)."""
    tokens, targets = windows[:, :-1], windows[:, 1:]  # [b,t]
    b, t = tokens.shape
    zeros = jnp.zeros(b, jnp.int32)
    state = SeqState(zeros, zeros, zeros, jnp.ones(b, jnp.float32))  # every row starts empty
    logits, _ = forward(params, cfg, tokens, init_cache(cfg, b, t), state, XLA)  # [b,t,v]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


# ---------------------------------------------------------------- AdamW


def decays(params: Params) -> Params:
    """True for the weights that take weight decay: matrices (not norms)."""
    return jax.tree_util.tree_map(lambda a: a.ndim == 2, params)


def learning_rate(s: Settings, step):
    """Linear warmup to s.lr, then cosine decay to s.min_lr at the last step."""
    warm = s.lr * (step + 1) / s.warmup
    done = jnp.clip((step - s.warmup) / max(s.steps - s.warmup, 1), 0.0, 1.0)
    cosine = s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + jnp.cos(jnp.pi * done))
    return jnp.where(step < s.warmup, warm, cosine)


def make_step(s: Settings, cfg: ModelConfig, mask: Params):
    b1, b2, eps = 0.9, 0.95, 1e-8

    @jax.jit
    def step(params, m, v, i, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, cfg, windows)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
        grads = jax.tree_util.tree_map(lambda g: g * jnp.minimum(1.0, s.clip / norm), grads)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        lr = learning_rate(s, i)
        c1, c2 = 1 - b1 ** (i + 1.0), 1 - b2 ** (i + 1.0)

        def update(p, m, v, decay):
            p = p - lr * s.weight_decay * p if decay else p
            return p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps)

        params = jax.tree_util.tree_map(update, params, m, v, mask)
        return params, m, v, loss, norm

    return step


# ---------------------------------------------------------------- evaluation


def windows_of(stream: np.ndarray, context: int) -> np.ndarray:
    """The stream cut into consecutive windows of context + 1 tokens, overlapping by one (every
    token after the first is predicted once); the tail that fills no window is dropped."""
    n = (len(stream) - 1) // context
    idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
    return stream[idx]


def perplexity(params: Params, cfg: ModelConfig, stream: np.ndarray, batch: int = 16) -> float:
    """exp(mean cross-entropy) over the stream's windows (`windows_of`)."""
    windows = windows_of(stream, cfg.max_len)
    if not len(windows):
        raise ValueError(f"{len(stream)} tokens fill no window of {cfg.max_len + 1}")
    loss = jax.jit(loss_fn, static_argnums=1)
    total = 0.0
    for a in range(0, len(windows), batch):
        chunk = windows[a : a + batch]
        total += float(loss(params, cfg, jnp.asarray(chunk))) * len(chunk)
    return math.exp(total / len(windows))


def held_out_documents(directory: Path) -> list[str]:
    """The held-out documents saved beside a checkpoint (heldout.txt)."""
    return (Path(directory) / "heldout.txt").read_text().split(DOC_SEPARATOR)


def model_perplexity(model, texts: list[str]) -> float:
    """Perplexity of a loaded model (`slimllm.load`) on `texts`, its weights as stored and the
    products in float32, windows as in training: what the model card reports."""
    from slimllm.jaxbackend.params import to_device

    stream = token_stream([model.tokenizer.encode(t) for t in texts], model.eos_ids[0])
    return perplexity(to_device(model.params), model.cfg, stream)


# ---------------------------------------------------------------- checkpoint


def hf_tensors(params: Params, cfg: ModelConfig, dtype) -> dict[str, np.ndarray]:
    """The device-layout weights under Hugging Face Llama names ([out, in], q/k/v and gate/up
    split again), in `dtype`."""
    d = cfg.head_dim
    q_rows, kv_rows = cfg.n_heads * d, cfg.n_kv_heads * d

    def host(a):
        return np.asarray(a, np.float32).astype(dtype)

    out = {
        "model.embed_tokens.weight": host(params.embed),
        "model.norm.weight": host(params.final_norm),
    }
    for i, p in enumerate(params.layers):
        pre = f"model.layers.{i}."
        q, k, v = np.split(np.asarray(p.w_qkv), [q_rows, q_rows + kv_rows])
        gate, up = np.split(np.asarray(p.w_gate_up), 2)
        out |= {
            pre + "input_layernorm.weight": host(p.attn_norm),
            pre + "post_attention_layernorm.weight": host(p.mlp_norm),
            pre + "self_attn.q_proj.weight": host(q),
            pre + "self_attn.k_proj.weight": host(k),
            pre + "self_attn.v_proj.weight": host(v),
            pre + "self_attn.o_proj.weight": host(p.wo),
            pre + "mlp.gate_proj.weight": host(gate),
            pre + "mlp.up_proj.weight": host(up),
            pre + "mlp.down_proj.weight": host(p.w_down),
        }
    return out


def write_checkpoint(out: Path, s: Settings, params: Params, cfg: ModelConfig, tok) -> None:
    import ml_dtypes
    from safetensors.numpy import save_file

    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[s.dtype]
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(params, cfg, dtype), out / "model.safetensors", {"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file makes it private to its owner
    tok.save(str(out / "tokenizer.json"))
    files = {
        "config.json": hf_config(s),
        "generation_config.json": {"bos_token_id": 0, "eos_token_id": 1},
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "add_bos_token": True,
            "model_max_length": s.context,
        },
    }
    for name, value in files.items():
        (out / name).write_text(json.dumps(value, indent=2) + "\n")


# ---------------------------------------------------------------- the run


def train(s: Settings, out: Path, docs: list[corpus.Document] | None = None) -> dict:
    """Train tokenizer and model on `docs` (default: the whole corpus), write the checkpoint to
    `out` and return the training log (also written there)."""
    t0 = time.perf_counter()
    docs = corpus.documents() if docs is None else docs
    train_docs, held_docs = corpus.split(docs)
    tok = train_tokenizer([d.text for d in train_docs], s.vocab)
    train_stream = encode_all(tok, [d.text for d in train_docs])
    held_stream = encode_all(tok, [d.text for d in held_docs])
    cfg = config_from_hf(hf_config(s))

    params = init_params(cfg, s.seed)
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    step = make_step(s, cfg, decays(params))
    rng = np.random.default_rng(s.seed)
    curve, losses, t_train = [], [], time.perf_counter()
    for i in range(s.steps):
        starts = rng.integers(0, len(train_stream) - s.context - 1, s.batch)
        windows = train_stream[starts[:, None] + np.arange(s.context + 1)[None, :]]
        params, m, v, loss, norm = step(params, m, v, jnp.float32(i), jnp.asarray(windows))
        losses.append(float(loss))
        if (i + 1) % s.log_every == 0 or i + 1 == s.steps:
            point = {
                "step": i + 1,
                "loss": round(float(np.mean(losses)), 4),
                "grad_norm": round(float(norm), 4),
                "lr": float(learning_rate(s, i)),
                "seconds": round(time.perf_counter() - t_train, 1),
            }
            if (i + 1) % s.eval_every == 0 or i + 1 == s.steps:
                point["held_out_perplexity"] = round(perplexity(params, cfg, held_stream), 3)
            curve.append(point)
            losses = []
            print(json.dumps(point), flush=True)
    train_seconds = time.perf_counter() - t_train

    write_checkpoint(out, s, params, cfg, tok)
    held_text = DOC_SEPARATOR.join(d.text for d in held_docs)
    (out / "heldout.txt").write_text(held_text)
    log = {
        "settings": dataclasses.asdict(s),
        "parameters": cfg.n_params(),
        "data": corpus.describe(docs)
        | {"training_tokens": len(train_stream), "held_out_tokens": len(held_stream)},
        "tokens_seen": s.steps * s.batch * s.context,
        "curve": curve,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "held_out_perplexity_float32": curve[-1]["held_out_perplexity"],
        "jax": jax.__version__,
        "machine": machine(),
        "load_average": round(os.getloadavg()[1], 2),  # 5 minutes: others sharing the cores
    }
    import slimllm  # the checkpoint as users load it: weights as stored

    stored = slimllm.load(out)
    log["held_out_perplexity"] = round(model_perplexity(stored, held_text.split(DOC_SEPARATOR)), 3)
    write_log(out, log)
    return log


def write_log(out: Path, log: dict) -> None:
    """training_log.json and the model card made from it."""
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (out / "README.md").write_text(model_card(log, out))


def machine() -> str:
    """The CPU's model name and the cores this process may use."""
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def model_card(log: dict, out: Path) -> str:
    """The model card (README.md of the checkpoint), every figure read from the training log."""
    s, data = log["settings"], log["data"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.name != "README.md") / 1e6
    rows = [p for p in log["curve"] if p["step"] % 100 == 0 or "held_out_perplexity" in p]
    curve = "\n".join(
        f"| {p['step']} | {p['loss']:.3f} | {p['lr']:.2e} | {p['seconds']:.0f} | "
        f"{p.get('held_out_perplexity', '')} |"
        for p in rows
    )
    check = log.get("transformers_check")
    agreement = (
        "Not checked yet: `python -m slimllm.train --check-transformers DIR` (oracle extra)."
        if check is None
        else (
            f"Loaded with transformers {check['transformers']} (`LlamaForCausalLM`, "
            f"`PreTrainedTokenizerFast`, torch {check['torch']}, float32) and run beside the "
            f"NumPy reference on {check['positions']} positions of held-out text: largest logit "
            f"difference {check['max_abs_logit_diff']:.2e} (logits up to "
            f"{check['max_abs_logit']:.1f}), the same top-1 token at "
            f"{check['top1_agreement']:.2%} of positions, and the two tokenizers gave "
            f"{'the same' if check['same_tokens'] else 'DIFFERENT'} ids for every held-out "
            "document."
        )
    )
    return f"""# pydoc-llama

A {log["parameters"] / 1e6:.1f}M-parameter Llama that writes text in the style of the Python
documentation. It ships inside slimllm for teaching and tests: `slimllm demo` runs it, and the
course in `docs/course/` reads its weights, attention maps and next-token distributions. It
is far too small to be right about Python; it only sounds like the documentation.

```python
import slimllm

model = slimllm.load(slimllm.SHIPPED_MODEL)
out = slimllm.generate(model, "Return a new list", max_new_tokens=40, temperature=0.8, seed=0)
print(out.text)
```

## Architecture

A Hugging Face `LlamaForCausalLM` directory: {s["layers"]} layers, width {s["width"]},
{s["heads"]} query heads sharing {s["kv_heads"]} key/value heads (GQA) of dimension
{s["width"] // s["heads"]}, SwiGLU MLP of width {s["ffn"]}, RMSNorm, RoPE (theta 10000), a
vocabulary of {s["vocab"]} tokens, an LM head tied to the embedding, and a context of
{s["context"]} tokens. Weights are stored as {s["dtype"]}: {size:.1f} MB with the tokenizer.

## Data

The documentation that Python {data["python"]} carries (`slimllm/corpus.py`): the language
reference topics of `pydoc_data.topics` (what `help("for")` prints) and the docstrings of the
standard library's modules, classes and functions, from its Python sources (read with `ast`)
and its C modules. {data["documents"]} documents: {data["training_documents"]} for training
({data["training_characters"]:,} characters, {data["training_tokens"]:,} tokens) and
{data["held_out_documents"]} held out ({data["held_out_characters"]:,} characters,
{data["held_out_tokens"]:,} tokens; chosen by a hash of each document's name, saved as
`heldout.txt`).

The text is copyright the Python Software Foundation and is used under the PSF License
Agreement, the license of Python itself.

## Tokenizer

A byte-level BPE of {s["vocab"]} tokens trained with the `tokenizers` library on the training
documents (`tokenizer.json`). Id 0 is `<s>`, prefixed to every encoded text, and id 1 is `</s>`,
which ends each document in training and ends generation.

## Training

`python -m slimllm.train --out DIR` (seeded: the same Python and library versions give the
same tokenizer and data order). The model is slimllm's own JAX forward differentiated with
`jax.grad`, AdamW (betas 0.9/0.95, weight decay {s["weight_decay"]} on matrices, gradients
clipped to norm {s["clip"]}), learning rate warmed up over {s["warmup"]} steps to {s["lr"]}
and decayed on a cosine to {s["min_lr"]}. {s["steps"]} steps of {s["batch"]} windows of
{s["context"]} tokens at random offsets: {log["tokens_seen"]:,} tokens, about
{log["tokens_seen"] / data["training_tokens"]:.1f} passes over the training tokens.

Wall time: {log["train_seconds"] / 60:.1f} minutes of training ({log["total_seconds"] / 60:.1f}
in all) on {log["machine"]}, with jax {log["jax"]}; 5-minute load average while training:
{log["load_average"]} (other work shared the cores).

| step | training loss | learning rate | seconds | held-out perplexity |
|---|---|---|---|---|
{curve}

## Evaluation

Held-out perplexity: **{log["held_out_perplexity"]}** with the weights as stored
({s["dtype"]}), {log["held_out_perplexity_float32"]} with the float32 weights at the end of
training, on the held-out documents cut into windows of {s["context"]} tokens
(`slimllm.train.model_perplexity`; `tests/test_shipped_model.py` measures it again).

## Agreement with transformers

{agreement}
"""


def check_transformers(out: Path) -> dict:
    """Load the checkpoint with transformers and compare its logits and tokens with slimllm's
    NumPy reference on held-out text; the result goes into the training log and model card."""
    import slimllm
    from slimllm.evaluate import sequence_logits

    model = slimllm.load(out)  # a missing or broken checkpoint says so before the oracle's imports
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    docs = held_out_documents(out)
    same = all(hf_tok(d)["input_ids"] == model.tokenizer.encode(d) for d in docs)
    tokens = [i for d in docs[:8] for i in model.tokenizer.encode(d)][: model.cfg.max_len]
    mine = sequence_logits(model, tokens, len(tokens), Runtime(backend="numpy"))  # [t,v]
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0].numpy()
    check = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "positions": len(tokens),
        "max_abs_logit_diff": float(np.max(np.abs(mine - theirs))),
        "max_abs_logit": float(np.max(np.abs(theirs))),
        "top1_agreement": float(np.mean(mine.argmax(-1) == theirs.argmax(-1))),
        "same_tokens": bool(same),
    }
    log = json.loads((out / "training_log.json").read_text())
    log["transformers_check"] = check
    write_log(out, log)
    return check


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m slimllm.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument(
        "--check-transformers",
        action="store_true",
        help="instead of training, compare the checkpoint in --out with transformers (oracle "
        "extra) and record the agreement in its model card",
    )
    p.add_argument("--steps", type=int, help="optimiser steps (default: the shipped model's)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run on a tiny config")
    args = p.parse_args(argv)
    if args.check_transformers:
        try:
            print(json.dumps(check_transformers(args.out)))
        except ImportError as e:
            p.exit(2, f"{p.prog}: error: --check-transformers needs the oracle extra ({e})\n")
        except (SlimllmError, OSError) as e:  # no checkpoint there, or a broken one
            p.exit(2, f"{p.prog}: error: {' '.join(str(e).split())}\n")
        return
    s = TINY if args.tiny else Settings()
    if args.steps is not None:
        s = dataclasses.replace(s, steps=args.steps)
    train(s, args.out)


if __name__ == "__main__":
    main()
