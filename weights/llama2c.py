"""llama2.c's `.bin` checkpoint format (version 0, "legacy export") -> reference Params.

Layout: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is stored separately), then float32 tensors
in torch Linear layout [out, in]: token embedding, attention norms, wq, wk, wv, wo, MLP norms,
w1 (gate), w2 (down), w3 (up), final norm, two legacy RoPE tables (seq_len * head_dim / 2 each,
read and ignored: slimllm recomputes the frequencies), and the classifier if unshared.
llama2.c rotates interleaved pairs (x[2i], x[2i+1]) with theta 10000 and RMSNorm eps 1e-5, so
the config says `rope_style="interleaved"` and the weights need no permutation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimllm.reference.config import ModelConfig
from slimllm.reference.params import LayerParams, Params, check_params

from .io import CheckpointError

HEADER = 7 * 4


def read_llama2c(path: Path) -> tuple[ModelConfig, Params]:
    path = Path(path)
    data = path.read_bytes()
    if len(data) < HEADER:
        raise CheckpointError(f"{path}: too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.frombuffer(data[:HEADER], np.int32)
    shared = vocab > 0
    vocab = abs(int(vocab))
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or dim % n_heads:
        raise CheckpointError(f"{path}: implausible llama2.c header {data[:HEADER].hex()}")
    head_dim = int(dim) // int(n_heads)
    kv_dim = int(n_kv) * head_dim
    cfg = ModelConfig(
        vocab=vocab,
        width=int(dim),
        n_layers=int(n_layers),
        n_heads=int(n_heads),
        n_kv_heads=int(n_kv),
        head_dim=head_dim,
        ffn_width=int(hidden),
        max_len=int(seq_len),
        norm_eps=1e-5,
        rope_style="interleaved",
        tied_head=bool(shared),
    )
    values = np.frombuffer(data[HEADER:], np.float32) if (len(data) - HEADER) % 4 == 0 else None
    if values is None:
        raise CheckpointError(f"{path}: payload is not a whole number of float32 values")
    offset = 0

    def take(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        if offset + n > values.size:
            raise CheckpointError(f"{path}: file ends early (truncated llama2.c checkpoint)")
        a = values[offset : offset + n].reshape(shape)
        offset += n
        return a

    L = cfg.n_layers
    embed = take(vocab, dim).copy()
    attn_norm = take(L, dim)
    wq, wk, wv = take(L, dim, dim), take(L, kv_dim, dim), take(L, kv_dim, dim)
    wo = take(L, dim, dim)
    mlp_norm = take(L, dim)
    w1, w2, w3 = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    final_norm = take(dim).copy()
    take(seq_len, head_dim // 2)  # legacy freq_cis_real: ignored
    take(seq_len, head_dim // 2)  # legacy freq_cis_imag: ignored
    lm_head = None if shared else take(vocab, dim).T.copy()
    if offset != values.size:
        raise CheckpointError(f"{path}: {values.size - offset} unexpected trailing values")

    def t(a):  # torch [out, in] -> ours [in, out]
        return np.ascontiguousarray(a.T)

    layers = [
        LayerParams(
            attn_norm=attn_norm[i].copy(),
            wq=t(wq[i]),
            wk=t(wk[i]),
            wv=t(wv[i]),
            wo=t(wo[i]),
            mlp_norm=mlp_norm[i].copy(),
            w_gate=t(w1[i]),
            w_up=t(w3[i]),
            w_down=t(w2[i]),
        )
        for i in range(L)
    ]
    params = Params(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)
    check_params(params, cfg)
    return cfg, params
