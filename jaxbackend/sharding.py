"""How a model is split across tensor-parallel ranks: one table, parameter name -> PartitionSpec.

The table is written for the reference layout, weights [in, out] (y = x @ w), so
"column-parallel" splits the last axis and "row-parallel" the first (Megatron-LM's terms);
`local_slice` cuts NumPy params with it. On the device, linear weights are [out, in] (see
`params.py`), and `device_spec` gives their specs with the axes swapped. The mesh has one axis,
"tp".

A `ShardPlan`, computed once from (cfg, tp), says what each rank holds; the model config is
never edited to describe a shard. Before splitting, `prepare` makes equivalent weights whose
every split is even:
- tp must divide the query heads, the FFN width and the vocabulary (else a clear error);
- when tp exceeds the kv heads (GQA/MQA), each kv head is replicated tp / k times, as xFT does,
  so every rank holds the one kv head its query heads use (k must divide tp);
- a tied LM head gets its own copy of the embedding table (the embedding is replicated for
  the token lookup, the head is split by vocabulary).

Every PartitionSpec lives here: the weight table, the cache, logits, traced intermediates, and
`LAYOUTS`, how each compiled program's arguments and results lie across the ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.params import Params
from slimllm.reference.weight_format import Compact

from .params import LINEAR, to_device
from .tp import AXIS

COLUMNS, ROWS, SPLIT, REPLICATED = P(None, AXIS), P(AXIS, None), P(AXIS), P()

SPECS = {
    # layer weights
    "wq": COLUMNS,  # column-parallel: a rank owns h/R query heads
    "wk": COLUMNS,  # column-parallel: ... and the matching kv heads
    "wv": COLUMNS,
    "bq": SPLIT,
    "bk": SPLIT,
    "bv": SPLIT,
    "q_norm": REPLICATED,  # per-head norm weights are shared by all heads
    "k_norm": REPLICATED,
    "wo": ROWS,  # row-parallel: partial sums -> allreduce #1
    "bo": REPLICATED,  # added once, after the reduce
    "w_gate": COLUMNS,  # column-parallel by FFN columns
    "w_up": COLUMNS,
    "b_up": SPLIT,
    "w_down": ROWS,  # row-parallel: partial sums -> allreduce #2
    "w_qkv": COLUMNS,  # device layout only: wq, wk, wv fused rank-major (see params.py)
    "w_gate_up": COLUMNS,  # device layout only: w_gate, w_up fused rank-major
    "b_down": REPLICATED,  # added once, after the reduce
    "attn_norm": REPLICATED,  # norms run redundantly on the replicated hidden state
    "attn_norm_b": REPLICATED,
    "mlp_norm": REPLICATED,
    "mlp_norm_b": REPLICATED,
    # model weights
    "embed": REPLICATED,  # every rank embeds the broadcast token ids itself
    "pos_embed": REPLICATED,
    "proj_in": REPLICATED,
    "proj_out": REPLICATED,
    "final_norm": REPLICATED,
    "final_norm_b": REPLICATED,
    "lm_head": COLUMNS,  # vocab-parallel: each rank scores its slice of the vocabulary
}
CACHE = P(None, AXIS, None, None)  # KV cache [b,k,s,d]: sharded on kv heads
CACHE_SCALES = P(None, AXIS, None)  # int8 scales [b,k,s]
VOCAB = P(None, AXIS)  # logits and seen-token masks [b, v]
VOCAB3 = P(None, None, AXIS)  # logits at every position [b, t, v]
HEADS = P(None, None, AXIS, None)  # traced q/k/v [b, t, h|k, d]

# How each program's arguments and results lie across the ranks (generate.py, sequence.py):
# "params" the weight table, "cache" the cache specs, "vocab"/"vocab3" split by vocabulary,
# "rep" replicated, "trace" a dict of traced intermediates.
LAYOUTS = {
    "prefill_fn": (("params", "rep", "cache", "rep", "rep"), ("vocab", "cache")),
    "decode_fn": (("params", "rep", "cache", "rep"), ("vocab", "cache")),
    "chunk_fn": (("params", "rep", "cache", "rep"), ("vocab3", "cache")),
    "trace_fn": (("params", "rep", "cache", "rep"), ("trace", "cache")),
    "gather_fn": (("vocab",), "rep"),
    "reorder_fn": (("cache", "rep"), "cache"),  # beam search (beam.py): rows gathered, heads kept
    "logprobs_fn": (("vocab", "rep"), ("rep", "rep", "rep")),
    "choose_fn": (("vocab", "vocab", "rep", "rep", "rep"), ("rep", "vocab", "rep")),
    "step_fn": (
        ("params", "rep", "cache", "rep", "vocab", "rep", "rep", "rep"),
        ("rep", "vocab", "vocab", "rep", "cache", "rep"),
    ),
    # continuous batching (batching.py)
    "serve_sample_fn": (("vocab", "vocab", "rep", "rep", "rep"), ("rep", "vocab", "rep")),
    "insert_fn": (("cache", "cache", "rep"), "cache"),
    "move_fn": (("cache", "vocab", "rep", "rep"), ("cache", "vocab")),
    "take_prefix_fn": (("cache",), "cache"),
    "put_prefix_fn": (("cache", "cache"), "cache"),
    "set_row_fn": (("vocab", "vocab", "rep"), "vocab"),
    "loop_fn": (
        ("params", "vocab", "cache", "rep", "vocab", "rep", "rep", "rep", "rep", "rep", "rep"),
        ("rep", "rep", "rep", "cache"),
    ),
}
# loop_fn and its token channel (generate.channel_stream: one process only)
LAYOUTS["channel_loop_fn"] = ((*LAYOUTS["loop_fn"][0], "rep"), LAYOUTS["loop_fn"][1])


@dataclass(frozen=True)
class ShardPlan:
    """What each of tp ranks holds of a model: computed once from (cfg, tp), validated."""

    tp: int
    heads: int  # query heads per rank
    kv_heads: int  # kv heads per rank (after replication)
    kv_copies: int  # each kv head is replicated this many times (tp > kv heads)
    vocab: int  # vocabulary slice per rank

    @classmethod
    def of(cls, cfg: ModelConfig, tp: int) -> ShardPlan:
        check_tp(cfg, tp)
        copies = tp // cfg.n_kv_heads if tp > cfg.n_kv_heads else 1
        return cls(tp, cfg.n_heads // tp, cfg.n_kv_heads * copies // tp, copies, cfg.vocab // tp)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise a clear error when the model cannot be split evenly over tp ranks."""
    if tp < 1:
        raise OptionError(f"tp must be >= 1, got {tp}")
    for what, n in (
        ("query heads", cfg.n_heads),
        ("FFN width", cfg.ffn_width),
        ("vocabulary", cfg.vocab),
    ):
        if n % tp:
            raise OptionError(f"tp={tp} does not divide the {n} {what}")
    k = cfg.n_kv_heads
    if k % tp and tp % k:
        raise OptionError(f"tp={tp} neither divides nor is a multiple of the {k} kv heads")


def prepare(params: Params, cfg: ModelConfig, plan: ShardPlan) -> Params:
    """Equivalent weights whose splits over the plan's ranks are all even (module docstring)."""
    copies, d = plan.kv_copies, cfg.head_dim

    def replicate_kv(w):  # [..., k*d] -> [..., k*copies*d], each head repeated in place
        if w is None or copies == 1:
            return w
        if isinstance(w, Compact):  # stored [k*d, cols]: repeat rows, values and scales alike
            return map_stored(w, lambda a: replicate_kv(a.T).T)
        shape = w.shape[:-1]
        heads = w.reshape(*shape, cfg.n_kv_heads, 1, d)  # [...,k*d] -> [...,k,1,d]
        return np.broadcast_to(heads, (*shape, cfg.n_kv_heads, copies, d)).reshape(*shape, -1)

    layers = [
        dataclasses.replace(
            layer,
            wk=replicate_kv(layer.wk),
            wv=replicate_kv(layer.wv),
            bk=replicate_kv(layer.bk),
            bv=replicate_kv(layer.bv),
        )
        for layer in params.layers
    ]
    lm_head = transpose(params.embed) if cfg.tied_head else params.lm_head
    prepared = dataclasses.replace(params, layers=layers, lm_head=lm_head)
    check_groups(prepared, plan.tp)
    return prepared


def map_stored(w: Compact, fn) -> Compact:
    """A Compact with fn applied to its stored values and to its scales."""
    scale = None if w.scale is None else fn(w.scale)
    return Compact(fn(w.values), scale, w.encoding, w.transposed)


def transpose(w):
    """The transpose of a reference weight (a Compact only flips its orientation)."""
    if isinstance(w, Compact):
        return Compact(w.values, w.scale, w.encoding, not w.transposed)
    return w.T.copy()


def split_axis(name: str, w) -> int | None:
    """The axis of w as stored that the table splits (None: replicated)."""
    axis = next((i for i, ax in enumerate(SPECS[name]) if ax == AXIS), None)
    return 1 - axis if axis is not None and isinstance(w, Compact) and w.transposed else axis


def check_groups(params: Params, tp: int) -> None:
    """A split across the input columns of a compact matrix (row-parallel) must not cut a
    quantisation group or a packed byte: a clear error instead of a wrong answer."""
    for obj in (params, *params.layers):
        for f in dataclasses.fields(obj):
            w = getattr(obj, f.name)
            if not isinstance(w, Compact) or split_axis(f.name, w) != 1:
                continue
            rows, cols = w.stored_shape
            groups = 1 if w.scale is None else w.scale.shape[1]
            if (cols // w.enc.pack) % tp or (groups > 1 and groups % tp):
                raise OptionError(
                    f"tp={tp} splits the {cols} input columns of {f.name} inside a weight group "
                    f"of {cols // groups} ({w.encoding}): choose a group dividing {cols // tp}"
                )


def device_spec(name: str, w=None):
    """The PartitionSpec of a weight in the device layout (linear weights are transposed); for a
    Compact, a Compact of specs: its scales split like its values, except per-channel scales
    ([rows, 1]) of a matrix split by columns, which every rank needs whole."""
    spec = SPECS[name]
    spec = P(*reversed(spec)) if name in LINEAR else spec
    if not isinstance(w, Compact):
        return spec
    per_channel = w.scale is None or w.scale.shape[1] == 1
    scale_spec = REPLICATED if per_channel and spec == P(None, AXIS) else spec
    return Compact(spec, None if w.scale is None else scale_spec, w.encoding, pairs=w.pairs)


def spec_tree(params: Params) -> Params:
    """A Params-shaped tree of device-layout PartitionSpecs (None where a weight is absent)."""

    def specs(obj):
        return {
            f.name: None
            if getattr(obj, f.name) is None
            else device_spec(f.name, getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.name != "layers"
        }

    layers = tuple(type(layer)(**specs(layer)) for layer in params.layers)
    return Params(layers=layers, **specs(params))


def cache_specs(cache):
    """The KV cache's PartitionSpecs (same tree as the cache)."""
    return dataclasses.replace(
        cache,
        k=tuple(CACHE for _ in cache.k),
        v=tuple(CACHE for _ in cache.v),
        k_scale=None if cache.k_scale is None else tuple(CACHE_SCALES for _ in cache.k_scale),
        v_scale=None if cache.v_scale is None else tuple(CACHE_SCALES for _ in cache.v_scale),
    )


def shard_params(params: Params, mesh, pairs: bool = False):
    """Place prepared NumPy params on the mesh devices, in the device layout (bfloat16 in pair
    order with `pairs`), following the table."""
    device = to_device(params, ranks=mesh.size, pairs=pairs)
    specs = spec_tree(device)
    return jax.tree_util.tree_map(
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
        device,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def local_slice(params: Params, rank: int, tp: int) -> Params:
    """Rank `rank`'s part of prepared NumPy params, still in the reference layout (MPI processes
    hold only their part; `to_device` then lays it out)."""

    def cut(a, axis):
        n = a.shape[axis] // tp
        return np.ascontiguousarray(np.take(a, range(rank * n, (rank + 1) * n), axis=axis))

    def part(name, a):
        axis = None if a is None else split_axis(name, a)
        if axis is None:
            return a
        if not isinstance(a, Compact):
            return cut(a, axis)
        # per-channel scales ([rows, 1]) of a matrix split by columns: every rank needs them
        whole = a.scale is None or (axis == 1 and a.scale.shape[1] == 1)
        scale = a.scale if whole else cut(a.scale, axis)
        return Compact(cut(a.values, axis), scale, a.encoding, a.transposed)

    def sliced(obj):
        return dataclasses.replace(
            obj,
            **{
                f.name: part(f.name, getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if f.name != "layers"
            },
        )

    return dataclasses.replace(sliced(params), layers=[sliced(layer) for layer in params.layers])


def trace_spec(name: str) -> P:
    """Traced q/k/v are split by heads across ranks, logits by vocabulary; the rest replicated."""
    if name.rsplit(".", 1)[-1] in ("q", "k", "v"):
        return HEADS
    return VOCAB3 if name == "logits" else REPLICATED


def layout(kind: str, arg, params, trace_names=()):
    """The PartitionSpec tree of one program argument or result of LAYOUTS kind `kind`
    (`arg`: the cache, for "cache")."""
    return {
        "params": lambda: spec_tree(params),
        "cache": lambda: cache_specs(arg),
        "vocab": lambda: VOCAB,
        "vocab3": lambda: VOCAB3,
        "rep": lambda: REPLICATED,
        "trace": lambda: {name: trace_spec(name) for name in trace_names},
    }[kind]()
