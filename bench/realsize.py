"""A real-size check: a random checkpoint with a real model's shapes (default Llama-3-8B), written
the way the hub stores it, then loaded and run through the public API in each weight format.

Writing: config.json (Llama layout, torch_dtype bfloat16) and bfloat16 safetensors split like
the hub's (shards of at most `--shard-mb`, 5 GB by default, with model.safetensors.index.json).
Tensors are drawn as `init_params` draws them (matrices N(0, 1/fan_in), embeddings N(0, 1), norms
near 1), one tensor at a time and in chunks of rows from a generator seeded per tensor, and
streamed to the file, so memory stays bounded (~CHUNK values) whatever the model's size.

Measuring: for each weight format and backend, a fresh child process (`python -m
slimllm.bench.realsize --child SPEC`) runs `slimllm.load(path, weights=FMT)`, then greedy
generation of `--new-tokens` from a `--prompt-len` prompt, and reports its load time, its own
peak RSS (after loading and at the end), first- and next-token latency. JAX first
runs one untimed generation (device copy and compilation: the cold first token); numpy has
nothing to compile and runs once. A child that fails (out of memory) is reported, not fatal.
The checkpoint is deleted afterwards unless --keep; --model measures an existing checkpoint.

`slimllm bench realsize [options]` (or `python -m bench.realsize`); options and JSON fields:
bench/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from slimllm.api import generate, load
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError
from slimllm.reference.params import layer_shapes, model_shapes
from slimllm.reference.runtime import Runtime
from slimllm.reference.weight_format import TRANSPOSED, weight_bytes
from slimllm.weights import load_config
from slimllm.weights.families.llama import FAMILY

from .common import log, peak_rss_bytes, r3, resolve_config, stats

CHUNK = 1 << 23  # values drawn at a time (32 MiB as float32)
FORMATS = ("bfloat16", "int8")  # the default --weights


# ---------------------------------------------------------------- writing


def hf_config(cfg: ModelConfig) -> dict:
    """config.json of a Llama-layout checkpoint of shape `cfg`: the inverse of the family's
    `config_from_hf`, checked by reading it back (a shape it cannot express is refused)."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": FAMILY.name,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_width,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tied_head,
    }
    if FAMILY.config_from_hf(hf) != cfg:
        raise OptionError(
            "realsize writes Llama-layout checkpoints (RMSNorm, rotate-half RoPE without "
            "scaling, SwiGLU, q/k/v/o biases all or none): this shape is not one"
        )
    return hf


def hub_tensors(cfg: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(canonical name, checkpoint name, checkpoint shape) of every weight, in model order.
    Linear weights are stored [out, in] (torch's layout, the transpose of the reference's)."""

    def entry(name, key, shape):
        return name, FAMILY.names[key], tuple(reversed(shape)) if name in TRANSPOSED else shape

    top = model_shapes(cfg)
    out = [entry("embed", "embed", top["embed"])]
    for i in range(cfg.n_layers):
        for name, shape in layer_shapes(cfg).items():
            _, hub, hub_shape = entry(name, f"layers.{{i}}.{name}", shape)
            out.append((name, hub.format(i=i), hub_shape))
    out += [entry(name, name, shape) for name, shape in top.items() if name != "embed"]
    return out


def random_rows(name: str, shape: tuple[int, ...], seed: int):
    """Yield a weight as bfloat16 in chunks of whole rows, drawn as `init_params` draws it."""
    rng = np.random.default_rng(seed)
    cols = shape[-1]
    rows = shape[0] if len(shape) == 2 else 1
    step = max(1, CHUNK // cols)
    for start in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        if name.endswith("norm"):
            x = 1 + np.float32(0.1) * x
        elif len(shape) == 1:
            x *= np.float32(0.1)  # biases
        elif name != "embed":
            x *= np.float32(cols**-0.5)  # N(0, 1/fan_in): [out, in] rows read `in` inputs
        yield x.astype(ml_dtypes.bfloat16)  # round to nearest even, as quant.to_bf16_bits


def shard_plan(tensors, max_bytes: int) -> list[list]:
    """Tensors split in order into shards of at most `max_bytes` (a larger tensor alone), as
    transformers' `save_pretrained(max_shard_size=...)` splits them."""
    shards, size = [[]], 0
    for t in tensors:
        n = 2 * int(np.prod(t[2]))
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def write_safetensors(path: Path, tensors, seeds: dict) -> int:
    """One safetensors file of bfloat16 tensors, streamed: the header (8-byte length, JSON padded
    to 8 bytes), then each tensor's rows as they are drawn. Returns the file's size."""
    header, offset = {}, 0
    for _, hub, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[hub] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, hub, shape in tensors:
            for chunk in random_rows(name, shape, seeds[hub]):
                chunk.tofile(f)
    return 8 + len(text) + offset


def write_checkpoint(directory: Path, cfg: ModelConfig, shard_bytes: int, seed: int = 0) -> dict:
    """A random bfloat16 checkpoint of shape `cfg` in `directory`, sharded like the hub's."""
    hf = hf_config(cfg)
    tensors = hub_tensors(cfg)
    total = sum(2 * int(np.prod(shape)) for _, _, shape in tensors)
    free = shutil.disk_usage(directory).free
    if free < total + 2**30:
        raise OptionError(f"{directory}: {total / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    seeds = {hub: [seed, i] for i, (_, hub, _) in enumerate(tensors)}
    shards = shard_plan(tensors, shard_bytes)
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        log(f"writing {name} ({len(shard)} tensors)")
        size = write_safetensors(directory / name, shard, seeds)
        files.append({"name": name, "bytes": size, "tensors": len(shard)})
        weight_map |= {hub: name for _, hub, _ in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {
        "files": files,
        "bytes": sum(f["bytes"] for f in files),
        "write_seconds": r3(time.perf_counter() - t0),
    }


# ---------------------------------------------------------------- measuring (child process)


def timed_generation(model, prompt: list[int], rt: Runtime, new_tokens: int) -> dict:
    """One greedy generation stamped per token, as decode.py stamps it."""
    stamps = []
    t0 = time.perf_counter()
    out = generate(
        model,
        ids=[prompt],
        max_new_tokens=new_tokens,
        eos_ids=(),
        on_token=lambda row, token: stamps.append(time.perf_counter()),
        runtime=rt,
    )
    return {
        "first_token_ms": r3((stamps[0] - t0) * 1e3),
        "next_token_ms": stats(np.diff(stamps) * 1e3),
        "compile_seconds": r3(out.compile_seconds),
        "ids": out.ids[0],
    }


def own_peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, the high-water mark of this program's
    own memory; ru_maxrss would start from the parent's resident size, which the kernel carries
    over fork and exec. Elsewhere ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return peak_rss_bytes()


def measure(spec: dict) -> dict:
    """In the child: load the checkpoint in one weight format and generate on one backend."""
    t0 = time.perf_counter()
    model = load(spec["path"], weights=spec["weights"], group=spec["weight_group"])
    out = {
        "load_seconds": r3(time.perf_counter() - t0),
        "weight_bytes": weight_bytes(model.params),
        "peak_rss_after_load_bytes": own_peak_rss_bytes(),
    }
    rt = Runtime(
        backend=spec["backend"],
        attention=spec["attention"],
        kv_dtype=spec["kv_dtype"],
        weights=spec["weights"],
        weight_group=spec["weight_group"],
    )
    prompt = np.random.default_rng(0).integers(0, model.cfg.vocab, spec["prompt_len"]).tolist()
    if rt.backend == "jax":
        t0 = time.perf_counter()
        model.engine(rt)  # the device copy of the weights; the model drops its host copy
        out["device_put_seconds"] = r3(time.perf_counter() - t0)
        cold = timed_generation(model, prompt, rt, spec["new_tokens"])
        out |= {
            "cold_first_token_ms": cold["first_token_ms"],
            "compile_seconds": cold["compile_seconds"],
        }
    timed = timed_generation(model, prompt, rt, spec["new_tokens"])
    timed["compile_seconds_while_timed"] = timed.pop("compile_seconds")
    return out | timed | {"peak_rss_bytes": own_peak_rss_bytes()}


def run_child(spec: dict) -> dict:
    """`measure` in a fresh process: its peak RSS is its own; a failure is reported."""
    cmd = [sys.executable, "-m", "slimllm.bench.realsize", "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        return {
            "error": done.stderr.strip()[-2000:] or f"exit status {done.returncode}",
            "returncode": done.returncode,
            "seconds": r3(time.perf_counter() - t0),
        }
    return json.loads(done.stdout) | {"seconds": r3(time.perf_counter() - t0)}


# ---------------------------------------------------------------- the benchmark


def run(args) -> dict:
    """Write the checkpoint (unless --model), then measure each format on each backend."""
    if args.tp != 1 or args.mode != "stream":
        raise OptionError("realsize runs one process per measurement: no --tp, no --mode loop")
    if args.model and args.layers is not None:
        raise OptionError("--layers cuts the checkpoint realsize writes; not with --model")
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise OptionError("need --prompt-len >= 1 and --new-tokens >= 2")
    backends = ["numpy", "jax"] if args.compare else [args.backend]
    names = list(args.weights or FORMATS)
    if args.model:
        cfg = load_config(args.model)
        source = f"checkpoint:{args.model}"
        info = {"source": source, "layers": cfg.n_layers, "layers_overridden_from": None}
    else:
        cfg, info = resolve_config(args.preset, args.config, args.layers)
    if args.prompt_len + args.new_tokens > cfg.max_len:
        raise OptionError(f"--prompt-len + --new-tokens exceeds the model's context {cfg.max_len}")
    info |= {"params": cfg.n_params(), "config": dataclasses.asdict(cfg)}
    if args.model:
        path, written = Path(args.model), {"written": False}
    else:
        hf_config(cfg)  # refused before anything is written
        parent = Path(args.dir or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="slimllm-realsize-", dir=parent))
        log(f"a random {cfg.n_params() / 1e9:.2f}B checkpoint of {info['source']} in {path}")
    try:
        if not args.model:
            written = {"written": True} | write_checkpoint(path, cfg, int(args.shard_mb * 1e6))
        runs = {name: measure_each(path, name, backends, args) for name in names}
    finally:
        kept = bool(args.keep or args.model)
        if not kept:
            shutil.rmtree(path, ignore_errors=True)
    return {
        "kind": "realsize",
        "model": info,
        "checkpoint": {"path": str(path), "kept": kept} | written,
        "settings": {
            "weights": names,
            "weight_group": args.weight_group,
            "backends": backends,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "attention": args.attention,
            "kv_dtype": args.kv_dtype,
        },
        "runs": runs,
        "same_ids_across_backends": {name: same_ids(runs[name]) for name in names},
    }


def measure_each(path: Path, name: str, backends: list[str], args) -> dict:
    """The checkpoint in weight format `name` on each backend, a child process each."""
    out = {}
    for backend in backends:
        log(f"{name} weights on {backend} (a child process)")
        spec = {
            "path": str(path),
            "weights": name,
            "weight_group": args.weight_group,
            "backend": backend,
            "attention": args.attention,
            "kv_dtype": args.kv_dtype,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
        }
        out[backend] = run_child(spec)
    return out


def same_ids(by_backend: dict) -> bool | None:
    """Whether every backend generated the same ids (None: fewer than two succeeded)."""
    ids = [r["ids"] for r in by_backend.values() if "ids" in r]
    return all(i == ids[0] for i in ids) if len(ids) > 1 else None


def summary(r: dict) -> str:
    m, c = r["model"], r["checkpoint"]
    head = f"realsize: {m['source']}, {m['params'] / 1e9:.2f}B params, {m['layers']} layers"
    if c["written"]:
        head += (
            f"; wrote {c['bytes'] / 1e9:.2f} GB in {len(c['files'])} file(s) "
            f"in {c['write_seconds']} s"
        )
    lines = [
        head,
        f"  {'weights':9s} {'backend':8s} {'load s':>7s} {'weights MB':>10s} {'peak MiB':>9s} "
        f"{'first ms':>9s} {'next ms':>9s} {'p90':>9s}",
    ]
    for name, by_backend in r["runs"].items():
        for backend, x in by_backend.items():
            if "error" in x:
                lines.append(f"  {name:9s} {backend:8s} failed: {x['error'].splitlines()[-1]}")
                continue
            nt = x["next_token_ms"]
            lines.append(
                f"  {name:9s} {backend:8s} {x['load_seconds']:7.1f} "
                f"{x['weight_bytes'] / 1e6:10,.0f} {x['peak_rss_bytes'] / 2**20:9,.0f} "
                f"{x['first_token_ms']:9.1f} {nt['mean']:9.1f} {nt['p90']:9.1f}"
            )
    lines.append(f"  same ids across backends: {r['same_ids_across_backends']}")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        sys.exit(0)
    from .cli import main  # here, not at the top: cli imports this module

    sys.exit(main(["realsize", *sys.argv[1:]]))
