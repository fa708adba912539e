"""What each `slimllm` subcommand does with its parsed options (cli.py parses them): the
commands return their JSON result and print the human form unless --json. User mistakes raise
a `SlimllmError`: `UserError` for what only the command line can get wrong (an option's syntax
or combination), the API's `OptionError` for the rest (status 2, one line on stderr).
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

from slimllm.jaxbackend import mpi
from slimllm.reference.errors import SlimllmError
from slimllm.reference.runtime import Runtime
from slimllm.weights import load_config, native_format, read_json

from .api import (
    SHIPPED_MODEL,
    check_format,
    check_text,
    compile_cache,
    demo_model,
    generate,
    load,
)
from .diff import diff, format_report, load_dump, parse_side
from .evaluate import compare, format_memory, memory_report, sample_sequence


class UserError(SlimllmError):
    """A command-line mistake (an option's value or combination)."""


def parse_ids(text: str, option: str = "--ids") -> list[int]:
    """Comma-separated token ids of `option` (named in the error)."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"{option} expects comma-separated integers, got {text!r}") from None
    if not ids:
        raise UserError(f"{option} is empty: expected comma-separated integers, e.g. 13,13")
    return ids


def text_option(text: str | None, option: str) -> str | None:
    """The text of `option` (--prompt, --text, --stop), refused by name when it holds bytes that
    are not UTF-8 (the shell passed them; Python keeps them as surrogate escapes)."""
    return None if text is None else check_text(text, option)


def runtime_from(args) -> Runtime:
    """The run settings the options name (validated by Runtime)."""
    return Runtime(
        backend=args.backend,
        attention=args.attention,
        kv_dtype=args.kv_dtype,
        tp=args.tp,
        weights=args.weights,
        weight_group=args.weight_group,
        kernels=args.kernels,
    )


def load_for(args):
    """The checkpoint of --model, its weights loaded directly in the --weights format (so the
    model keeps that encoding alone, not float32 weights beside it)."""
    runtime_from(args)  # a bad setting fails before minutes of loading, not after
    return load(args.model, weights=args.weights, group=args.weight_group)


def run_generation(model, args, default_ids=None) -> dict:
    if args.prompt is None and args.ids is None and default_ids is None:
        raise UserError("give --prompt TEXT or --ids 1,2,3")
    ids = parse_ids(args.ids) if args.ids else None
    if args.prompt is None and ids is None:
        ids = default_ids
    prompt = text_option(args.prompt, "--prompt")
    stop = [text_option(s, "--stop") for s in args.stop]
    stop += [parse_ids(s, "--stop-ids") for s in args.stop_ids]
    inject_fault()
    printer = None if args.json else StreamPrinter(model.tokenizer)
    out = generate(
        model,
        prompt,
        ids=ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False}.get(args.early_stopping, "never"),
        seed=args.seed,
        eos_ids=() if args.no_eos else None,
        stop=stop,
        on_token=printer,
        runtime=runtime_from(args),
    )
    if printer:
        printer.finish()
    result = {
        "ids": out.ids[0],
        "prompt_ids": out.prompt_ids[0],
        "finish_reason": out.finish_reasons[0],
        "prefill_seconds": round(out.prefill_seconds, 6),
        "decode_seconds": round(out.decode_seconds, 6),
        "tokens_per_second": round(out.tokens_per_second, 2),
        "compile_seconds": round(out.compile_seconds, 3),
        "backend": args.backend,
        "attention": args.attention,
        "kv_dtype": args.kv_dtype,
        "weights": args.weights or model.weights,
        "weight_group": args.weight_group if args.weights else model.weight_group,
        "tp": model.engine(runtime_from(args)).comm.size if args.backend == "jax" else 1,
    }
    if out.scores:  # beam search
        result["score"] = out.scores[0]
    if out.text is not None:
        result["text"] = out.text
    return result


def inject_fault() -> None:
    """Testing aid for distributed runs: SLIMLLM_FAULT="RANK:raise", "RANK:kill" or "RANK:stop"
    makes that MPI rank fail (raise, SIGKILL itself, or SIGSTOP itself: alive but silent) just
    before generating, while the others enter their first collective."""
    fault = os.environ.get("SLIMLLM_FAULT", "")
    if not fault:
        return
    rank, kind = fault.split(":")
    if mpi.launched_size() > 1 and mpi.rank() == int(rank):
        if kind in ("kill", "stop"):
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        raise RuntimeError(f"injected fault on rank {rank}")


class StreamPrinter:
    """Prints text (or ids) as tokens arrive; text is decoded in full and printed as it grows,
    holding back a trailing incomplete UTF-8 sequence."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is None:
            print(token, end=" ", flush=True)
            return
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        print(text[len(self.printed) :], end="", flush=True)
        self.printed = text

    def finish(self) -> None:
        print(flush=True)


def cmd_generate(args) -> dict:
    return run_generation(load_for(args), args)


# The demo samples (a small model's greedy text soon repeats itself), seeded: the same text on
# every run. Each is a default of `slimllm demo`'s options, so any can be changed.
DEMO_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 80}
DEMO_PROMPT = "Open the file"


def cmd_demo(args) -> dict:
    if args.random:  # made in float32; a --weights run encodes it once (params_for)
        model = demo_model()
    else:
        args.model = args.model or str(SHIPPED_MODEL)
        model = load_for(args)
    if args.prompt is None and args.ids is None and model.tokenizer is not None:
        args.prompt = DEMO_PROMPT
    if args.prompt is not None and model.tokenizer is None:  # before anything is printed
        raise UserError(f"{model.source} has no tokenizer: give --ids instead of --prompt")
    if not args.json:
        print(f"model: {model.source} ({model.cfg.n_params() / 1e6:.1f}M parameters)")
        print("-" * 72)
        if args.prompt is not None:
            print(args.prompt, end="", flush=True)  # the continuation streams after it
    result = run_generation(model, args, default_ids=[model.bos_id or 1])
    result["model"] = model.source
    if not args.json:
        print("-" * 72)
        print(
            f"{len(result['ids'])} tokens, {result['tokens_per_second']} tokens/s decoding, "
            f"first token {result['prefill_seconds'] * 1000:.0f} ms, "
            f"compile {result['compile_seconds']:.1f} s "
            f"({args.backend} backend, {result['weights']} weights)"
        )
        print(next_steps(model))
    return result


def next_steps(model) -> str:
    """What to try after the demo, with this model's path in the commands."""
    path = model.source if " " not in model.source else f'"{model.source}"'
    lines = ["Try next:"]
    if model.tokenizer is not None:
        lines += [
            '  slimllm demo --prompt "The json module" --seed 1      another prompt, other samples',
            f'  slimllm generate --model {path} --prompt "Return the" --temperature 0 --stop "."',
            f'  slimllm eval --model {path} --text "Return a new list." --kv-dtype int8',
        ]
    lines += [
        "  slimllm demo --backend numpy                the NumPy reference: same maths, slower",
        "  slimllm demo --random                       a 44M random-weight model (speed only)",
        "  the course, chapter by chapter: docs/course/ (built as a site by mkdocs build)",
    ]
    return "\n".join(lines)


def own_format(path) -> str:
    """The format `load` keeps a checkpoint in without --weights, as far as its config says:
    its torch_dtype (weights.native_format, without tensors), else float32 (always for llama2.c)."""
    path = Path(path)
    if path.is_file() and path.suffix != ".json":
        return "float32"
    return native_format(read_json(path if path.is_file() else path / "config.json"), {})


def cmd_memory(args) -> dict:
    """Weights + KV cache from the config alone (`slimllm memory`, formerly `kv-size`)."""
    if args.context < 1 or args.batch < 1:
        raise UserError("--context and --batch must be positive")
    if args.memory is not None and not 0 < args.memory < math.inf:  # NaN fails both
        raise UserError(f"--memory must be a positive number of GiB, got {args.memory}")
    cfg = load_config(args.model)
    weights = args.weights or own_format(args.model)
    Runtime(weights=weights, weight_group=args.weight_group)  # validates the pair
    check_format(cfg, weights, args.weight_group)  # and that it can store this model
    report = memory_report(cfg, args.context, args.batch, weights, args.weight_group, args.memory)
    if not args.json:
        print(format_memory(report))
    return report


def read_ids_file(path) -> list[int]:
    try:
        return [int(t) for t in Path(path).read_text().replace(",", " ").split()]
    except ValueError:  # not integers, or not text (UnicodeDecodeError)
        raise UserError(f"{path}: expected whitespace or comma separated token ids") from None


def cmd_eval(args) -> dict:
    if args.length < 2 or args.greedy_tokens < 1:
        raise UserError("--length must be >= 2 and --greedy-tokens >= 1")
    setting = runtime_from(args)
    # Loaded without --weights: the checkpoint's own values are the float32 baseline, and the
    # setting's weight format is encoded from them once (Model.params_for).
    model = load(args.model)
    prompt = parse_ids(args.ids) if args.ids else None
    if args.ids_file:
        tokens = read_ids_file(args.ids_file)
    elif args.text:
        if model.tokenizer is None:
            raise UserError("this model has no tokenizer: use --ids-file")
        tokens = model.tokenizer.encode(text_option(args.text, "--text"))
    else:
        prompt = prompt or [model.bos_id if model.bos_id is not None else 1]
        tokens = sample_sequence(model, prompt, min(args.length, model.cfg.max_len), args.seed)
    tokens = tokens[: args.length]
    prompt_len = args.prompt_len or (len(prompt) if prompt else 1)
    if not 1 <= prompt_len < len(tokens):
        raise UserError(f"need a prompt of 1..{len(tokens) - 1} tokens, got {prompt_len}")
    report = compare(model, tokens, prompt_len, setting, greedy_tokens=args.greedy_tokens)
    report["model"] = model.source
    if not args.json:
        kl, g = report["kl"], report["greedy"]
        print(
            f"{model.source}: {setting.describe()} vs float32 naive reference, "
            f"{len(tokens)} positions"
        )
        print(f"  KL mean {kl['mean']:.3e}  p99 {kl['p99']:.3e}  max {kl['max']:.3e}")
        print(f"  top-1 agreement {report['top1_agreement']:.4f}")
        print("  perplexity {baseline:.4f} -> {setting:.4f}".format(**report["perplexity"]))
        print(f"  greedy: identical for {g['identical_prefix']} of {g['tokens']} tokens")
    return report


def cmd_bench(args) -> dict:
    # Imports jax: only here, after prepare_devices has set the XLA device count for --tp.
    from .bench.cli import run, summary

    report = run(args)  # bench/ checks its options with OptionError
    if not args.json:
        print(summary(report))
    return report


def cmd_diff(args) -> dict:
    given = [b for b in (args.b, args.against, args.dump and f"dump:{args.dump}") if b]
    if len(given) > 1:
        raise UserError("give one of --b, --against, --dump")
    side_a, side_b = parse_side(args.a), parse_side(given[0] if given else "jax")
    args.tp = max(side_a.rt.tp, side_b.rt.tp)
    prepare_devices(args)
    model = load(args.model)
    if args.ids or args.ids_file:
        tokens = parse_ids(args.ids) if args.ids else read_ids_file(args.ids_file)
    elif args.text:
        if model.tokenizer is None:
            raise UserError("this model has no tokenizer: use --ids")
        tokens = model.tokenizer.encode(text_option(args.text, "--text"))
    elif side_b.kind == "dump":
        tokens = load_dump(side_b.path)[0]
    else:
        start = [model.bos_id if model.bos_id is not None else 1]
        tokens = sample_sequence(model, start, min(args.length, model.cfg.max_len), seed=0)
    prompt_len = args.prompt_len or len(tokens)
    report = diff(model, tokens, prompt_len, side_a, side_b, args.tol)
    if not args.json:
        print(format_report(report))
    return report


def cmd_serve(args) -> dict:
    """Load the model, make its scheduler, serve until a signal has drained it."""
    try:
        from .server import listen, serve
    except ImportError as err:  # starlette, uvicorn or jinja2 missing
        raise UserError(
            f"slimllm serve needs the serve extra ({err.name} is missing): "
            "pip install 'slimllm[serve]'"
        ) from None
    from slimllm.jaxbackend.batching import Scheduler  # jax: after prepare_devices

    args.model = args.model or str(SHIPPED_MODEL)
    if not 0 <= args.port < 65536 or not args.drain_timeout >= 0:
        raise UserError("--port must be in [0, 65535] and --drain-timeout >= 0")
    sock = listen(args.host, args.port)  # a port in use fails before the model loads
    model = load_for(args)
    scheduler = Scheduler(
        model,
        runtime_from(args),
        max_batch=args.max_batch,
        cache_len=args.cache_len,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    name = args.model_name or Path(model.source).name or "model"
    serve(model, scheduler, name, sock, args.drain_timeout)
    return {}


COMMANDS = {
    "generate": cmd_generate,
    "demo": cmd_demo,
    "memory": cmd_memory,
    "kv-size": cmd_memory,  # the report's first name, when it counted only the KV cache
    "eval": cmd_eval,
    "bench": cmd_bench,
    "diff": cmd_diff,
    "serve": cmd_serve,
}


def prepare_devices(args) -> None:
    """Before jax is imported: one process with --tp N needs N XLA CPU devices."""
    tp = getattr(args, "tp", 1)
    if tp > 1 and mpi.launched_size() == 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={tp}".strip()


def prepare_compile_cache(args) -> None:
    """--compile-cache DIR|off: where this process keeps compiled programs (unset: the default,
    $SLIMLLM_COMPILE_CACHE or ~/.cache/slimllm/xla, chosen by the first engine)."""
    value = getattr(args, "compile_cache", None)
    if value is not None:
        from slimllm.jaxbackend.engine import cache_dir_of  # jax: after prepare_devices

        compile_cache(cache_dir_of(value))
