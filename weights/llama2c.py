"""llama2.c's `.bin` checkpoint format (version 0, "legacy export") -> reference Params.

Layout: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is stored separately), then float32 tensors
in torch Linear layout [out, in]: token embedding, attention norms, wq, wk, wv, wo, MLP norms,
w1 (gate), w2 (down), w3 (up), final norm, two legacy RoPE tables (seq_len * head_dim / 2 each,
read and ignored: slimllm recomputes the frequencies), and the classifier if unshared.
llama2.c rotates interleaved pairs (x[2i], x[2i+1]) with theta 10000 and RMSNorm eps 1e-5, so
the config says `rope_style="interleaved"` and the weights need no permutation.

The header is checked (positive sizes, heads dividing the width and each other, an even head
dimension) and the sizes it implies, in exact integer arithmetic, against the file's size before
any data is read, so a header cannot make the loader read or allocate more than the file holds;
then each weight is read (a block of rows at a time, straight from the file) and encoded in the
requested weight format by `weights.stream.encode_rows`, as for Hugging Face checkpoints.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np

from slimllm.reference.config import ModelConfig
from slimllm.reference.params import LayerParams, Params, check_params
from slimllm.reference.weight_format import WeightFormat, weight_format

from .io import CheckpointError, Lazy
from .stream import encode_rows

HEADER = 7 * 4
# llama2.c's names for what it stores -> ours (w1, w2, w3: gate, down, up); None: ignored.
NAMES = {
    "token_embedding": "embed",
    "rms_att_weight": "attn_norm",
    "wq": "wq",
    "wk": "wk",
    "wv": "wv",
    "wo": "wo",
    "rms_ffn_weight": "mlp_norm",
    "w1": "w_gate",
    "w2": "w_down",
    "w3": "w_up",
    "rms_final_weight": "final_norm",
    "freq_cis_real": None,  # legacy RoPE tables: slimllm recomputes the frequencies
    "freq_cis_imag": None,
    "wcls": "lm_head",
}
PER_LAYER = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3")


def llama2c_config(path: Path) -> ModelConfig:
    """The model config in a llama2.c file's header (a negative vocab: an unshared classifier)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = f.read(HEADER)
    if len(header) < HEADER:
        raise CheckpointError(f"{path}: too short for a llama2.c header")
    ints = [int(n) for n in np.frombuffer(header, "<i4")]
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    values = ", ".join(f"{name}={n}" for name, n in zip(names, ints, strict=True))
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len, abs(vocab)) <= 0:
        raise CheckpointError(
            f"{path}: implausible llama2.c header ({values}): a size is not > 0 (expected a "
            "llama2.c .bin file or a Hugging Face checkpoint directory)"
        )
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise CheckpointError(
            f"{path}: implausible llama2.c header ({values}): n_heads must divide dim into an "
            "even head dimension, and n_kv_heads must divide n_heads"
        )
    try:
        return ModelConfig(
            vocab=abs(vocab),
            width=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=dim // n_heads,
            ffn_width=hidden,
            max_len=seq_len,
            norm_eps=1e-5,
            rope_style="interleaved",
            tied_head=vocab > 0,
        )
    except ValueError as e:  # a check of ModelConfig's that the header fails
        raise CheckpointError(f"{path}: llama2.c header ({values}): {e}") from None


def layout(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a llama2.c file in order, torch layout, per-layer ones stacked [L, ...]."""
    e, f, L, v = cfg.width, cfg.ffn_width, cfg.n_layers, cfg.vocab
    kv = cfg.n_kv_heads * cfg.head_dim
    rope = (cfg.max_len, cfg.head_dim // 2)
    shapes = [(v, e), (L, e), (L, e, e), (L, kv, e), (L, kv, e), (L, e, e), (L, e)]
    shapes += [(L, f, e), (L, e, f), (L, f, e), (e,), rope, rope, (v, e)]
    pairs = list(zip(NAMES, shapes, strict=True))
    return pairs[:-1] if cfg.tied_head else pairs


def read_rows(path: Path, offset: int, shape: tuple[int, ...], a=None, b=None) -> np.ndarray:
    """Rows a:b (all by default) of the float32 tensor of `shape` at byte `offset` of a file."""
    row = math.prod(shape[1:])
    a, b = (0, shape[0]) if a is None else (a, min(b, shape[0]))
    w = np.fromfile(path, np.float32, count=(b - a) * row, offset=offset + 4 * a * row)
    return w.reshape(b - a, *shape[1:])


def read_llama2c(
    path: Path, fmt: WeightFormat | None = None, group: int | None = None
) -> tuple[ModelConfig, Params]:
    """The config and weights of a llama2.c file, the weights in format `fmt` (float32 default)."""
    path = Path(path)
    fmt = fmt or weight_format("float32")
    cfg = llama2c_config(path)
    tensors = layout(cfg)
    payload = path.stat().st_size - HEADER
    expected = 4 * sum(math.prod(shape) for _, shape in tensors)  # exact: no int64 wrap
    sizes = f"the header's model needs {expected} bytes of weights, the file holds {payload}"
    if payload % 4:
        raise CheckpointError(f"{path}: payload is not a whole number of float32 values; {sizes}")
    if payload < expected:
        raise CheckpointError(f"{path}: file ends early (truncated llama2.c checkpoint?); {sizes}")
    if payload > expected:
        raise CheckpointError(
            f"{path}: {(payload - expected) // 4} unexpected trailing values; {sizes}"
        )

    def weight(name, offset, shape, where):
        read = partial(read_rows, path, offset, shape)
        lazy = Lazy(path, name + where, np.dtype(np.float32), shape, read, by_rows=True)
        return encode_rows(NAMES[name], lazy, fmt, group)

    top, layers, offset = {}, [{} for _ in range(cfg.n_layers)], HEADER
    for name, shape in tensors:
        if name in PER_LAYER:
            size = 4 * math.prod(shape[1:])
            for i, layer in enumerate(layers):
                layer[NAMES[name]] = weight(name, offset + i * size, shape[1:], f"[{i}]")
        elif NAMES[name]:
            top[NAMES[name]] = weight(name, offset, shape, "")
        offset += 4 * math.prod(shape)
    params = Params(layers=[LayerParams(**layer) for layer in layers], **top)
    check_params(params, cfg)
    return cfg, params
