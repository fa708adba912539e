"""The `slimllm` command line.

    slimllm demo                                   text from the shipped model, no files
    slimllm generate --model DIR --prompt TEXT     stream a continuation
    slimllm generate --model F.bin --ids 1 --json  one JSON object: ids, text, timings
    slimllm serve --model DIR --port 8000          an OpenAI-compatible HTTP server

User mistakes (missing file, bad option, prompt longer than the context) exit with status 2 and
one line on stderr, never a traceback: each raises a `SlimllmError` (or an OSError reading a
file), the one type caught here; anything else is a bug and shows its traceback. `--json`
output is strict JSON: a non-finite number is written as null. This module holds the options
and the entry points; commands.py runs each subcommand (`slimllm bench` runs the
`slimllm.bench` package in bench/).
"""

from __future__ import annotations

import argparse
import os
import sys

from slimllm.jaxbackend import mpi
from slimllm.reference.errors import SlimllmError
from slimllm.reference.kv_cache import KV_DTYPES
from slimllm.reference.runtime import ATTENTION, BACKENDS, KERNELS
from slimllm.reference.weight_format import WEIGHT_DTYPES

from .bench.common import add_arguments as add_bench_arguments
from .commands import (
    COMMANDS,
    DEMO_SAMPLING,
    UserError,
    prepare_compile_cache,
    prepare_devices,
)
from .diff import SIDE_SYNTAX
from .strict_json import dumps


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        raise UserError(message)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    src.add_argument("--ids", help="prompt token ids, comma separated, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1: off)")
    p.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam search: a finished beam scores sum of log-probs / new ids ** X",
    )
    p.add_argument(
        "--early-stopping",
        choices=("true", "false", "never"),
        default="false",
        help="beam search: when a prompt's search ends (HF's early_stopping)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-ids", action="append", default=[], help="stop id sequence, e.g. 13,13")
    p.add_argument("--no-eos", action="store_true", help="ignore the model's EOS ids")
    add_setting_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_setting_options(p: argparse.ArgumentParser) -> None:
    """The options of one `Runtime` (choices from its registries)."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="jax",
        help="jax: compiled (default); numpy: the reference",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks: XLA devices of this process, or the mpiexec job",
    )
    p.add_argument(
        "--attention",
        choices=tuple(ATTENTION),
        default="naive",
        help="naive (the definition), slim (SlimAttention), flash (the 2-D baseline)",
    )
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="float32", help="KV cache storage")
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default="auto",
        help="auto: slimllm's compiled kernels where they are built (default); fast: also "
        "weight products on rounded activations (bfloat16/int8 in AMX tiles where the CPU has "
        "AMX, else 16-bit integers for int8 weights, int8 per 32 columns for int4); xla: pure XLA",
    )
    add_weight_options(p)
    add_compile_cache_option(p)


def add_compile_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="keep compiled programs in DIR for later runs, or nowhere (default: "
        "$SLIMLLM_COMPILE_CACHE, else ~/.cache/slimllm/xla)",
    )


def add_weight_options(p: argparse.ArgumentParser, default: str = "the checkpoint's own") -> None:
    p.add_argument(
        "--weights",
        choices=WEIGHT_DTYPES,
        help=f"weight storage (default: {default}); products are float32",
    )
    p.add_argument(
        "--weight-group",
        type=int,
        help="input columns per scale of int8/int4 weights (default: per channel for int8, "
        "32 for int4); must divide every matrix's input width",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="slimllm", description="Exact, fast, teachable LLM inference on CPUs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="generate a continuation from a checkpoint")
    g.add_argument("--model", required=True, help="HF checkpoint directory or llama2.c .bin")
    add_generation_options(g)
    d = sub.add_parser(
        "demo",
        help="generate text with the shipped model (or --model PATH, or --random)",
        description="Streams a continuation of --prompt (default: a sentence in the style of "
        "the Python documentation) from the small Llama slimllm ships, trained on the standard "
        "library's documentation, then prints its speed and what to try next.",
    )
    which = d.add_mutually_exclusive_group()
    which.add_argument("--model", help="run this checkpoint instead of the shipped model")
    which.add_argument(
        "--random",
        action="store_true",
        help="a random-weight 44M-parameter Llama instead (no tokenizer: prints token ids)",
    )
    add_generation_options(d)
    d.set_defaults(**DEMO_SAMPLING)
    k = sub.add_parser(
        "memory",
        aliases=["kv-size"],
        help="memory of the weights and KV cache for a model's config",
        description="Bytes of the weights in each format (--weights: the one to total) and of "
        "the KV cache per dtype for --batch x --context, and the whole GiB they fit in. Reads "
        "only the config: no weights are loaded.",
    )
    k.add_argument("--model", required=True, help="checkpoint directory, config.json or .bin")
    k.add_argument("--context", type=int, default=4096)
    k.add_argument("--batch", type=int, default=1)
    add_weight_options(k, default="the config's torch_dtype, else float32")
    k.add_argument("--memory", type=float, help="GiB available: say whether each total fits")
    k.add_argument("--json", action="store_true")
    e = sub.add_parser("eval", help="accuracy of a setting against the float32 naive reference")
    e.add_argument("--model", required=True)
    seq = e.add_mutually_exclusive_group()
    seq.add_argument("--ids-file", help="token ids (whitespace or comma separated)")
    seq.add_argument("--text", help="text to tokenize (needs the model's tokenizer)")
    e.add_argument("--ids", help="prompt ids; the rest of the sequence is sampled from the model")
    e.add_argument("--prompt-len", type=int, help="tokens of the sequence prefilled as a prompt")
    e.add_argument("--length", type=int, default=500, help="positions to evaluate")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--greedy-tokens", type=int, default=200)
    add_setting_options(e)
    e.add_argument("--json", action="store_true")
    b = sub.add_parser(
        "bench",
        help="decode latency, weight-product, attention and KV-cache benchmarks, a real-size check",
    )
    add_bench_arguments(b)
    add_compile_cache_option(b)
    add_serve_parser(sub)
    f = sub.add_parser(
        "diff",
        help="per-layer divergence of two implementations (slimllm settings, hf, a dump)",
        description=f"Sides: {SIDE_SYNTAX}. 'hf' is transformers (oracle extra); "
        "'dump:FILE.npz' holds your implementation's intermediates: a 'tokens' array plus "
        "keys like embed, layers.0.attn_in, layers.0.q, layers.0.attn_out, layers.0.out, "
        "final_norm, logits.",
    )
    f.add_argument("--model", required=True)
    fseq = f.add_mutually_exclusive_group()
    fseq.add_argument("--ids", help="token ids, comma separated")
    fseq.add_argument("--ids-file", help="token ids (whitespace or comma separated)")
    fseq.add_argument("--text", help="text to tokenize")
    f.add_argument("--length", type=int, default=64, help="sampled tokens when no ids are given")
    f.add_argument("--prompt-len", type=int, help="tokens read as the prompt (prefix-LM, NTK)")
    f.add_argument("--a", default="numpy", help="the reference side (default: numpy)")
    f.add_argument("--b", help="the side to check (default: jax)")
    f.add_argument("--against", choices=["hf"], help="shorthand for --b hf")
    f.add_argument("--dump", help="shorthand for --b dump:FILE")
    f.add_argument("--tol", type=float, default=1e-4, help="relative tolerance")
    add_compile_cache_option(f)
    f.add_argument("--json", action="store_true")
    return parser


def add_serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (continuous batching; the serve extra)",
        description="Serves /v1/completions, /v1/chat/completions, /v1/models, /health and "
        "/metrics until SIGTERM or Ctrl-C, which drains: running requests finish (at most "
        "--drain-timeout seconds), new ones get 503, then the process exits with status 0.",
    )
    s.add_argument(
        "--model", default=None, help="checkpoint directory (default: the shipped model)"
    )
    s.add_argument("--model-name", help="the id clients name (default: the directory's name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests; more get 429")
    s.add_argument(
        "--cache-len", type=int, help="KV slots per request (default: the context, at most 2048)"
    )
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish on SIGTERM")
    s.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="longer prompts prefill in chunks of this many tokens between decode steps",
    )
    s.add_argument(
        "--prefix-cache-tokens",
        type=int,
        help="KV slots kept for prompts that share first tokens (default: 4 x --cache-len; 0: off)",
    )
    add_setting_options(s)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv=None) -> int:
    if mpi.launched_size() > 1:
        return main_mpi(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:  # no command: say what there is, not only that one is missing
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        prepare_devices(args)
        prepare_compile_cache(args)
        result = COMMANDS[args.command](args)
    except (SlimllmError, OSError) as e:
        print(f"slimllm: error: {one_line(e)}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(dumps(result))
    return 0


def main_mpi(argv=None) -> int:
    """One rank of `mpiexec -n R slimllm ...`: rank 0 prints, the others stay quiet; any failure
    on any rank prints one line and aborts the whole job, so no rank waits forever (a rank that
    goes silent is caught by mpi.Heartbeat). The JSON result is printed only once every rank has
    finished its part."""
    try:
        rank = mpi.rank()
    except SlimllmError as e:  # the job's setup (e.g. $SLIMLLM_MPI_TIMEOUT): said by rank 0
        if os.environ.get("PMI_RANK", "0") == "0":
            print(f"slimllm: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    if rank:  # before parsing, so that --help and usage print once
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            parser = build_parser()
            if not argv:
                if rank == 0:
                    parser.print_help(sys.stderr)
                mpi.barrier()
                return 2
            args = parser.parse_args(argv)
            if getattr(args, "backend", "jax") != "jax":
                raise UserError(
                    f"--backend {args.backend} runs the whole model in one process; under "
                    f"mpiexec ({mpi.size()} ranks) use --backend jax, or run without mpiexec"
                )
        except UserError as e:  # the same mistake on every rank: say it once, end together
            if rank == 0:
                print(f"slimllm: error: {one_line(e)}", file=sys.stderr, flush=True)
            mpi.barrier()
            return 2
        prepare_compile_cache(args)
        result = COMMANDS[args.command](args)
        mpi.barrier()  # every rank succeeded: only now is there a result to print
        if getattr(args, "json", False):
            print(dumps(result))
        sys.stdout.flush()
        return 0
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank
        print(
            f"slimllm: error (rank {rank} of {mpi.size()}): {one_line(e)}",
            file=sys.stderr,
            flush=True,
        )
        mpi.abort(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
