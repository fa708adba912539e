"""The public Python API: `load` a checkpoint, `generate` from text or ids.

This layer only resolves user input (text or ids, one prompt or many, option names as in HF
generate()) and picks a backend; the maths lives in `slimllm.reference` (NumPy, the definition)
and `slimllm.jaxbackend` (jit-compiled). Every bad argument raises a `SlimllmError` naming it,
the same in both backends: the request is checked by the reference's functions (`Stopping`,
`SamplingConfig`, `check_mode`, `check_request`), whichever backend then runs it.
"""

from __future__ import annotations

import dataclasses
import os
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimllm.jaxbackend import mpi
from slimllm.reference.beam import BeamConfig, check_beam_request
from slimllm.reference.beam import generate as run_reference_beams
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.generate import Stopping, check_mode
from slimllm.reference.generate import generate as run_reference
from slimllm.reference.logprobs import TokenLogprob, check_logprobs
from slimllm.reference.params import Params, init_params
from slimllm.reference.runtime import BACKENDS, Runtime
from slimllm.reference.sampling import SamplingConfig
from slimllm.reference.weight_format import encode_params, weight_format
from slimllm.weights import load_checkpoint, load_config

from .progress import shards

__all__ = [
    "BACKENDS",
    "Model",
    "Output",
    "Runtime",
    "TokenLogprob",
    "compile_cache",
    "demo_model",
    "generate",
    "load",
]


@dataclass
class Model:
    """A loaded model: config, weights (`params`, in format `weights`), tokenizer, special ids.

    At most one copy of the weights is kept: once a JAX engine holds the model's weights in
    their own format, the host copy is released, and read again from `source` (same format and
    group) only if the NumPy backend asks for it. Models that no `load` made (a demo) keep
    theirs, and so do models whose `params` were assigned; to change loaded weights, assign
    `params` (an edit inside the Params object would be lost when they are read again).
    """

    cfg: ModelConfig
    params: Params = field(repr=False, compare=False)  # a property, defined below the class
    tokenizer: object | None = None
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    family: str = ""
    source: str = ""
    hf_config: dict = field(default_factory=dict, repr=False)
    weights: str = "float32"  # the weight format `params` are stored in
    weight_group: int | None = None
    _engines: dict = field(default_factory=dict, repr=False)
    _formats: dict = field(default_factory=dict, repr=False)

    def format_of(self, rt: Runtime) -> tuple[str, int | None]:
        """(weight format, group) that `rt` asks for (the loaded ones if it names none)."""
        return (rt.weights or self.weights, rt.weight_group if rt.weights else self.weight_group)

    def params_for(self, rt: Runtime) -> Params:
        """The weights in `rt`'s format: as loaded when it names none (or the loaded one), else
        re-encoded once from the loaded weights and kept."""
        key = self.format_of(rt)
        if key == (self.weights, self.weight_group):
            return self.params
        if key not in self._formats:
            check_format(self.cfg, *key)
            self._formats[key] = encode_params(self.params, weight_format(key[0]), key[1])
        return self._formats[key]

    def placed(self, rt: Runtime) -> Runtime:
        """`rt` with the transport this process runs under: under mpiexec the ranks split the
        model (tp = the job's size), else tp XLA devices of this process."""
        ranks = mpi.launched_size()
        if ranks > 1 and rt.tp not in (1, ranks):
            raise OptionError(f"--tp {rt.tp} but mpiexec started {ranks} ranks: they must match")
        return rt.replace(tp=ranks, transport="mpi") if ranks > 1 else rt

    def engine(self, rt: Runtime = Runtime()):
        """The JAX engine of this model (device weights, compiled programs) for `rt`'s tp and
        transport, made on first use. The engine holds the weights from then on, so the host
        copy it was made from is dropped when it can be made again: another format is encoded
        again from the loaded weights, the loaded ones are read again from `source`."""
        rt = self.placed(rt)
        fmt = self.format_of(rt)
        # jax (~0.5 s to import) only once needed; the device count for tp is set by then.
        from slimllm.kernels.linear import pair_order_wanted

        # bfloat16 weights are laid out for the kernels choice (jaxbackend/params.py)
        key = (rt.tp, rt.transport, *fmt, fmt[0] == "bfloat16" and pair_order_wanted(rt.kernels))
        if key not in self._engines:
            from slimllm.jaxbackend.engine import Engine
            from slimllm.jaxbackend.sharding import check_groups, check_tp

            params = self.params_for(rt)
            # heads, widths or weight groups that tp ranks cannot split: before placing anything
            check_tp(self.cfg, rt.tp)
            check_groups(params, rt.tp)
            own = fmt == (self.weights, self.weight_group)
            # weights that can be made again are given up as they are placed (Engine consume):
            # placing an 8B model in bf16 never holds 2 x 16 GB
            consume = not own or self._rereadable
            self._engines[key] = Engine(params, self.cfg, rt, consume=consume)
            if not own:
                self._formats.pop(fmt, None)
            elif self._rereadable:
                self._host = None
        return self._engines[key]

    def _get_params(self) -> Params:
        if self._host is None and self._rereadable:  # released to an engine: read it again
            again = load_checkpoint(
                self.source, tokenizer=False, weights=self.weights, group=self.weight_group
            )
            self._host = again.params
        return self._host

    def _set_params(self, params: Params) -> None:
        self._host = params
        self._rereadable = False  # these may differ from the checkpoint (e.g. cut by a benchmark)


# `params` is a property set here, after @dataclass, which would take a property in the class
# body for the field's default value; the generated __init__ assigns `params` through it.
Model.params = property(Model._get_params, Model._set_params)


@dataclass
class Output:
    """What `generate` returns, a list entry per prompt row: `ids` (the new ids only, the one
    that stopped the row included), `texts` (those decoded; None without a tokenizer),
    `finish_reasons` ("length", "eos" or "stop"), `prompt_ids` (the prompts as ids), `logits`
    (with `return_logits`; else empty), `logprobs` (with `logprobs=n`, per row a list of one
    `TokenLogprob(logprob, top)` per id; else empty) and `scores` (with num_beams > 1, each
    row's beam search score; else empty). Timings leave compilation out:
    `prefill_seconds` (the prompts, to their first logits), `decode_seconds` (choosing every id
    and the decode steps between), `decode_steps` (those steps), `compile_seconds` (JAX:
    compiling programs)."""

    ids: list[list[int]]  # generated ids per prompt
    texts: list[str | None]
    finish_reasons: list[str]
    prompt_ids: list[list[int]]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    compile_seconds: float = 0.0
    logits: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per row: [TokenLogprob per id]
    scores: list = field(default_factory=list)  # num_beams > 1: each row's hypothesis score

    @property
    def text(self) -> str | None:
        """The first row's text (None without a tokenizer)."""
        return self.texts[0]

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over all rows, excluding the first token (prefill)."""
        if self.decode_seconds <= 0:
            return 0.0
        return self.decode_steps * len(self.ids) / self.decode_seconds


def load(path, progress=None, weights: str | None = None, group: int | None = None) -> Model:
    """Load a Hugging Face checkpoint directory or a llama2.c .bin file, its weights stored in
    format `weights` (a WEIGHT_FORMATS name; None: the checkpoint's own dtype) with `group`
    input columns per scale (None: the format's default). `progress(files)` wraps the list of
    weight files as they are read (default: a bar on stderr when there are several)."""
    progress = progress or shards
    if weights is not None:  # a format that cannot store this model fails before the weights load
        check_format(load_config(path), weights, group)
    ck = load_checkpoint(path, progress=progress, weights=weights, group=group)
    model = Model(
        ck.cfg,
        ck.params,
        ck.tokenizer,
        ck.eos_ids,
        ck.bos_id,
        ck.family,
        ck.source,
        ck.hf_config,
        weights=ck.weights,
        weight_group=group,
    )
    model._rereadable = True  # `params` are what load_checkpoint(source, weights, group) gives
    return model


# The small Llama slimllm ships, trained on the standard library's documentation by
# `python -m slimllm.train` (its model card, README.md, is in the directory).
SHIPPED_MODEL = Path(__file__).parent / "models" / "pydoc-llama"
"""The folder of the model slimllm ships, a Hugging Face Llama directory with its tokenizer:
`slimllm.load(slimllm.SHIPPED_MODEL)`."""

DEMO_CONFIG = ModelConfig(
    vocab=32000,
    width=512,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    head_dim=64,
    ffn_width=1376,
    max_len=1024,
    norm_eps=1e-5,
    rope_theta=10000.0,
)


def compile_cache(directory: str | os.PathLike | None) -> Path | None:
    """Keep the JAX backend's compiled programs in `directory` (None: nowhere) instead of
    $SLIMLLM_COMPILE_CACHE or ${XDG_CACHE_HOME:-~/.cache}/slimllm/xla: a later process on the
    same model and shapes reads them instead of compiling. Applies from the next compile on;
    returns the directory (None: none)."""
    from slimllm.jaxbackend.engine import compile_cache as use  # jax: as in Model.engine

    return use(directory)


def demo_model(cfg: ModelConfig = DEMO_CONFIG, seed: int = 0) -> Model:
    """A deterministic random-weight Llama-shaped model (no checkpoint needed)."""
    return Model(cfg, init_params(cfg, seed), family="demo", source=f"random(seed={seed})")


def check_format(cfg: ModelConfig, weights: str, group: int | None) -> None:
    """An OptionError when format `weights` in groups of `group` input columns cannot store the
    matrices of `cfg` (a group that does not divide a row), found from the config alone."""
    from .evaluate import weight_bytes_for  # evaluate imports this module

    try:
        weight_bytes_for(cfg, weight_format(weights), group)
    except OptionError as err:  # check_group's message: which group and which row width
        raise OptionError(f"weights {weights}: {err}") from None


def check_text(text, name: str = "prompt") -> str:
    """`text` if it is a str that is valid Unicode: text from a command line with bytes that are
    not UTF-8 arrives holding surrogate escapes, which no tokenizer can encode."""
    if not isinstance(text, str):
        raise OptionError(f"{name} must be text (str), got {reprlib.repr(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise OptionError(
            f"{name} is not valid UTF-8 text (an undecodable byte at character {err.start})"
        ) from None
    return text


def resolve_prompts(model: Model, prompt, ids) -> list:
    """The prompt rows as given (ids, checked by the backend's `check_request`) or tokenized."""
    if (prompt is None) == (ids is None):
        raise OptionError("give exactly one of prompt (text) or ids")
    if ids is not None:
        if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
            raise OptionError(f"ids must be a list of token ids, got {reprlib.repr(ids)}")
        ids = list(ids)
        nested = ids and all(isinstance(row, list | tuple | np.ndarray) for row in ids)
        return ids if nested else [ids]
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, list | tuple):
        raise OptionError(f"prompt must be a str or a list of str, got {reprlib.repr(prompt)}")
    texts = [check_text(t) for t in texts]
    if model.tokenizer is None:
        raise OptionError("this model has no tokenizer: pass token ids instead of text")
    return [model.tokenizer.encode(t) for t in texts]


def generate(
    model: Model,
    prompt: str | Sequence[str] | None = None,
    *,
    ids=None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_ids: Sequence[int] | None = None,
    stop: Sequence[str | Sequence[int]] = (),
    on_token: Callable[[int, int], None] | None = None,
    backend: str = "jax",
    attention: str = "naive",
    kv_dtype: str = "float32",
    cache_len: int | None = None,
    return_logits: bool = False,
    logprobs: int | None = None,
    mode: str | None = None,
    tp: int = 1,
    weights: str | None = None,
    weight_group: int | None = None,
    kernels: str = "auto",
    runtime: Runtime | None = None,
) -> Output:
    """Continue each prompt by up to `max_new_tokens` ids -> `Output`. Sampling follows Hugging
    Face `generate()`; a seed gives the same ids on every run, and a row of a batch the ids it
    gives alone. A bad argument raises an `OptionError` (a `SlimllmError`) naming it.

    The prompts, exactly one of:

    - `prompt`: text (needs the model's tokenizer), or a list of texts.
    - `ids`: token ids, one list or a list of lists (rows may differ in length).

    When a row stops (each on its own; the id that stops it is kept in its output):

    - `max_new_tokens`: after this many ids ("length"), at least 1; the longest prompt plus it
      must fit the model's context (`model.cfg.max_len`).
    - `eos_ids`: on any of these ids ("eos"); None: the model's own (`model.eos_ids`), (): none.
    - `stop` ("stop"): token-id lists, met when the row's newest ids equal one; strings (need a
      tokenizer), met when the decoded text of the row's new ids contains one. A lone string
      is one stop string.

    How each id is chosen, in this order (each default turns its step off):

    - `repetition_penalty` (> 0; 1 off): the logit of every id in the prompt or the output so
      far is divided by it if positive, multiplied by it if negative (greedy runs too).
    - `temperature` (>= 0): logits are divided by it; below 1e-5 (the default 0) the choice is
      greedy, the argmax (lowest id on ties), and the three filters below are skipped.
    - `top_k` (integer >= 0; 0 off): keep the k highest scores (ties with the k-th kept).
    - `top_p` (in (0, 1]; 1 off): keep the most likely tokens until their probability reaches
      p (the token that crosses p is kept).
    - `min_p` (in [0, 1]; 0 off): drop tokens less likely than min_p times the most likely.
    - `seed`: one integer for every row, or a list of one per row, in `[-2**63, 2**64)`: row r's
      draw at step n is a pure function of (seed of row r, n) (counter-based Threefry-2x32).

    Beam search (HF semantics; deterministic: temperature, top_k, top_p, min_p and stop must
    stay at their defaults, and the penalty applies to log-probabilities, as HF does):

    - `num_beams` (integer in [1, 256]; 1 off): each step keeps the num_beams best
      continuations of each prompt (by their sums of log-probabilities); one ends on an EOS id
      or at max_new_tokens. The row's result is the best ended one, `Output.scores[r]` its score:
      sum / n ** `length_penalty` (a finite number; n its new ids; > 0 favours longer ones).
      `on_token` is called with its ids once the search has ended.
    - `early_stopping`: a row is settled once num_beams continuations have ended and: True,
      at once; False (default), the best running one, scored at its length, cannot beat them;
      "never", the same scored at max_new_tokens when length_penalty > 0.

    What the caller sees while generating:

    - `on_token(row, id)`: called as each id is chosen (rows in order); needs mode "stream".
    - `return_logits`: `Output.logits[r]` is float32 [n, v]: the raw logits (before penalty,
      temperature and filters) that chose each of row r's n ids; needs mode "stream".
    - `logprobs` (None off; an integer n in [0, 20], at most the vocabulary): `Output.logprobs[r]`
      holds a `TokenLogprob` per id of row r: `logprob`, the id's log-probability under the
      model's raw logits (log_softmax before penalty, temperature and filters, as vLLM and
      OpenAI's API report), and `top`, the n most likely ids as (id, logprob), most likely
      first, ties to the lowest id; needs mode "stream" (the JAX backend computes them on the
      device and copies only those numbers).
    - `mode`: the JAX backend's form. "loop": the whole token loop is one compiled program
      (no round trip to Python per token; the ids arrive at the end); "stream": one compiled
      decode step and one sampling step per token, the host sees each id. None: "stream" when
      `on_token`, stop strings, `return_logits` or `logprobs` need it, else "loop". The NumPy
      backend checks it the same way and runs its one loop.

    How it computes: one `Runtime`, given as `runtime` (then the keywords below are ignored) or
    made from them:

    - `backend`: "jax" (compiled, the fast path) or "numpy" (the reference, the definition).
    - `attention`: "naive" (the definition), "slim" (SlimAttention: blocks of query rows, exact
      softmax per row) or "flash" (2-D tiles, online softmax); equal up to float rounding.
    - `kv_dtype`: the KV cache's storage: "float32", "float16", "bfloat16" or "int8" (one
      float32 scale per token per head).
    - `cache_len`: KV slots per row (None: the longest prompt + max_new_tokens, which the JAX
      backend rounds up to a few shared lengths, so that calls share compiled programs); it
      must hold that sum and not exceed the model's context.
    - `tp`: tensor-parallel ranks (JAX backend only); it must divide the query heads, the FFN
      width and the vocabulary, and divide or be a multiple of the KV heads. In one process
      the model is split over tp XLA CPU devices, which exist only if
      `XLA_FLAGS=--xla_force_host_platform_device_count=N` (N >= tp) was set before jax was
      first imported (`import slimllm` does not import it; the first JAX run does). Under
      `mpiexec -n R` each process is one rank: tp is R (given as 1 or R).
    - `weights`: the weight format to run in ("float32", "bfloat16", "float16", "int8",
      "int4"; None: as loaded); another format is encoded once from the loaded weights and
      kept on the model. `weight_group`: input columns per scale for int8/int4 (None: the
      format's default, one scale per row for int8, 32 columns for int4).
    - `kernels` (JAX backend): "auto" calls slimllm's compiled kernels where they are built
      (float32 arithmetic); "fast" lets weight products also round activations, to bfloat16 or
      int8 in AMX tiles where the CPU has AMX, else to 16 bits for int8 weights and to int8
      per 32 columns for int4 weights; "xla" never calls them.
    """
    rt = runtime or Runtime(
        backend=backend,
        attention=attention,
        kv_dtype=kv_dtype,
        tp=tp,
        cache_len=cache_len,
        weights=weights,
        weight_group=weight_group,
        kernels=kernels,
    )
    prompts = resolve_prompts(model, prompt, ids)
    tok = model.tokenizer
    stop = [stop] if isinstance(stop, str) else stop
    if not hasattr(stop, "__iter__"):
        raise OptionError(f"stop must be a list of strings or token-id lists, got {stop!r}")
    stopping = Stopping(
        max_new_tokens=max_new_tokens,
        eos_ids=model.eos_ids if eos_ids is None else eos_ids,
        stop_sequences=tuple(s for s in stop if not isinstance(s, str)),
        stop_strings=tuple(check_text(s, "stop") for s in stop if isinstance(s, str)),
        decode=tok.decode if tok is not None else None,
    )
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    logprobs = check_logprobs(logprobs, model.cfg.vocab)
    check_mode(mode, stopping, on_token, return_logits, logprobs)  # the reference: any mode
    options = dict(seeds=seed, on_token=on_token, return_logits=return_logits, logprobs=logprobs)
    if rt.backend != "jax" and mpi.launched_size() > 1:
        raise OptionError(
            f"backend {rt.backend!r} runs the whole model in one process; under mpiexec "
            f"({mpi.launched_size()} ranks) use backend 'jax', or run without mpiexec"
        )
    beam = beam_config(num_beams, length_penalty, early_stopping, stopping, sampling, options, mode)
    if rt.backend == "jax":
        from slimllm.jaxbackend.generate import generate as run_jax  # jax: as in Model.engine

        rt = model.placed(rt)
        engine = model.engine(rt)
        if engine.comm.per_process:  # the master's ids and settings reach every rank
            prompts, stopping, sampling, options["seeds"] = mpi.bcast_object(
                (prompts, dataclasses.replace(stopping, decode=None), sampling, seed)
            )
            stopping = dataclasses.replace(stopping, decode=tok.decode if tok else None)
        if beam.num_beams > 1:
            from slimllm.jaxbackend.beam import generate as run_beams

            result = run_beams(engine, prompts, stopping, beam, sampling, on_token, rt=rt)
        else:
            result = run_jax(engine, prompts, stopping, sampling, rt=rt, mode=mode, **options)
    elif beam.num_beams > 1:
        params = model.params_for(rt)
        result = run_reference_beams(
            params, model.cfg, prompts, stopping, beam, sampling, on_token, rt
        )
    else:
        result = run_reference(
            model.params_for(rt), model.cfg, prompts, stopping, sampling, rt=rt, **options
        )
    ids_out = [row.ids for row in result.rows]
    return Output(
        ids=ids_out,
        texts=[tok.decode(i) if tok is not None else None for i in ids_out],
        finish_reasons=[row.finish_reason for row in result.rows],
        prompt_ids=prompts,
        prefill_seconds=result.prefill_seconds,
        decode_seconds=result.decode_seconds,
        decode_steps=result.decode_steps,
        compile_seconds=result.compile_seconds,
        logits=[np.array(row.logits) for row in result.rows] if return_logits else [],
        logprobs=[row.logprobs for row in result.rows] if logprobs is not None else [],
        scores=[row.score for row in result.rows] if beam.num_beams > 1 else [],
    )


def beam_config(num_beams, length_penalty, early_stopping, stopping, sampling, options, mode):
    """The checked beam search settings; with num_beams > 1, the options it cannot honour
    (sampling, stop rules, logits, logprobs, the one-program loop) refused by name."""
    beam = BeamConfig(num_beams, length_penalty, early_stopping)
    if beam.num_beams > 1:
        check_beam_request(stopping, sampling)
        for name in ("return_logits", "logprobs"):
            if options.get(name) not in (None, False):
                raise OptionError(f"{name} is not supported with num_beams > 1")
        if mode == "loop":
            raise OptionError("beam search runs one step at a time: mode='loop' needs num_beams=1")
    return beam
