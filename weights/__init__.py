"""Checkpoints and tokenizers -> reference Params: the only code that knows hub tensor names.

`load_checkpoint(path)` accepts a Hugging Face checkpoint directory (config.json plus
safetensors or PyTorch .bin weights, single or sharded) or a llama2.c `.bin` file, and returns
the model config, the weights (slimllm layout, in a weight format: by default the checkpoint's
own dtype), the tokenizer found beside them, and the special ids generation needs. Tensors are
read and encoded one at a time (`weights.convert`), so a load holds its result and a small
transient, never the whole model in float32 unless that is its format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from slimllm.reference.config import ModelConfig
from slimllm.reference.params import Params
from slimllm.reference.weight_format import weight_format

from .convert import convert
from .families import detect
from .families.common import eos_ids
from .io import CheckpointError, Lazy, read_tensors
from .llama2c import llama2c_config, read_llama2c
from .tokenizer import load_tokenizer


@dataclass
class Checkpoint:
    cfg: ModelConfig
    params: Params
    family: str
    tokenizer: object | None = None
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    source: str = ""
    hf_config: dict = field(default_factory=dict)
    weights: str = "float32"  # the weight format of `params`


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def special_ids(directory: Path, hf: dict) -> tuple[tuple[int, ...], int | None]:
    """EOS ids and BOS id: generation_config.json first, then config.json."""
    gen = (
        read_json(directory / "generation_config.json")
        if (directory / "generation_config.json").exists()
        else {}
    )
    eos = eos_ids(gen.get("eos_token_id", hf.get("eos_token_id")))
    bos = gen.get("bos_token_id", hf.get("bos_token_id"))
    return eos, bos


# Formats a checkpoint's own dtype can name (float64 loads as float32).
NATIVE = ("float32", "bfloat16", "float16")


def native_format(hf: dict, tensors: dict[str, Lazy]) -> str:
    """The checkpoint's own dtype, as transformers' torch_dtype="auto": config.json's torch_dtype
    (or dtype) when it names one of NATIVE, else the dtype of the first floating-point matrix
    listed (shards in order, each one's names sorted, as the safetensors library lists them)."""
    named = hf.get("torch_dtype") or hf.get("dtype")
    if named in NATIVE:
        return named
    for t in tensors.values():
        if len(t.shape) == 2 and t.dtype.name in (*NATIVE, "float64"):
            return t.dtype.name if t.dtype.name in NATIVE else "float32"
    return "float32"


def load_config(path) -> ModelConfig:
    """Only the model config of a checkpoint directory, a config.json, or a llama2.c .bin."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix != ".json":
        return llama2c_config(path)
    hf = read_json(path if path.is_file() else path / "config.json")
    return detect(hf).config_from_hf(hf)


def load_checkpoint(
    path, progress=None, tokenizer: bool = True, weights: str | None = None, group=None
) -> Checkpoint:
    """Load a checkpoint directory or llama2.c .bin file (strict: see weights.convert), its
    weights in format `weights` (None: the checkpoint's own, see `native_format`; llama2.c
    files are float32) with `group` columns per scale."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if weights is not None:
        weight_format(weights)  # an unknown name fails before anything is read
    if path.is_file():
        fmt = weights or "float32"
        cfg, params = read_llama2c(path, weight_format(fmt), group)
        return Checkpoint(cfg, params, "llama2c", source=str(path), weights=fmt)
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint?)")
    hf = read_json(config_path)
    family = detect(hf)
    cfg = family.config_from_hf(hf)
    with read_tensors(path) as tensors:
        fmt = weights or native_format(hf, tensors)
        params = convert(family, cfg, tensors, weight_format(fmt), group, progress)
    eos, bos = special_ids(path, hf)
    tok = None
    if tokenizer:
        tok = load_tokenizer(path, hf)
        if tok is not None and not eos:
            eos = tuple(tok.eos_ids)
    return Checkpoint(cfg, params, family.name, tok, eos, bos, str(path), hf, fmt)
