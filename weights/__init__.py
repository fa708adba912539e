"""Checkpoints and tokenizers -> reference Params: the only code that knows hub tensor names.

`load_checkpoint(path)` accepts a Hugging Face checkpoint directory (config.json plus
safetensors or PyTorch .bin weights, single or sharded) or a llama2.c `.bin` file, and returns
the model config, the weights (slimllm layout, in a weight format: by default the checkpoint's
own dtype), the tokenizer found beside them, and the special ids generation needs. Tensors are
read and encoded one at a time (`weights.convert`), so a load holds its result and a small
transient, never the whole model in float32 unless that is its format.

Model and tokenizer must agree, and this is checked before any weight is read: the EOS/BOS ids
of generation_config.json / config.json are integers inside the model's vocabulary, and so is
every id the tokenizer can produce, its specials included (a model may have more embedding rows
than its tokenizer has ids, padding, never fewer). A file of a checkpoint given where its
directory belongs (config.json, one weight file) is refused as such, not read as llama2.c.
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
from .io import CheckpointError, Lazy, read_tensors, shown
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
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON {type(data).__name__}, expected an object")
    return data


def token_ids(value, key: str, path: Path, vocab: int) -> tuple[int, ...]:
    """A config's token id or list of ids, each an integer inside the model's vocabulary."""
    values = () if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise CheckpointError(
                f"{path}: {key} {shown(value)} is not a token id (an integer in [0, {vocab}), "
                "the model's vocabulary)"
            )
    return tuple(values)


def special_ids(directory: Path, hf: dict, vocab: int) -> tuple[tuple[int, ...], int | None]:
    """EOS ids and BOS id: generation_config.json first, then config.json; each checked to be
    a token id of the model's `vocab`."""
    gen_path = directory / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else {}

    def ids(key: str) -> tuple[int, ...]:
        value, path = (
            (gen[key], gen_path) if key in gen else (hf.get(key), directory / "config.json")
        )
        if key == "bos_token_id" and isinstance(value, list):
            raise CheckpointError(f"{path}: {key} {shown(value)} must be one id, not a list")
        return token_ids(value, key, path, vocab)

    bos = ids("bos_token_id")
    return ids("eos_token_id"), (bos[0] if bos else None)


def check_tokenizer(tok, cfg: ModelConfig) -> None:
    """Every id the tokenizer can produce, its specials included, is a row of the model's
    vocabulary (a model may have more rows than the tokenizer has ids: padding)."""
    ids = [tok.vocab_size - 1, tok.bos_id, *tok.eos_ids, *tok.prefix_ids, *tok.suffix_ids]
    largest = max((i for i in ids if i is not None), default=-1)
    if largest >= cfg.vocab:
        raise CheckpointError(
            f"{tok.path}: the tokenizer has {tok.vocab_size} ids (largest {largest}) but the "
            f"model's vocabulary has {cfg.vocab} (config.json vocab_size): they do not belong "
            "together"
        )


def not_llama2c(path: Path) -> None:
    """A file given where a llama2.c .bin was expected but which is plainly something else: JSON
    (text starting with { or [: a llama2.c header's small int32s hold zero bytes), safetensors,
    or a PyTorch file (a zip, or a legacy pickle: both would be a header of absurd sizes)."""
    with open(path, "rb") as f:
        head = f.read(16)
    text = all(32 <= c < 127 or c in b"\t\r\n" for c in head)
    if path.suffix == ".json" or (text and head.strip()[:1] in (b"{", b"[")):
        what = "a JSON file"
    elif path.suffix == ".safetensors" or head[:4] == b"PK\x03\x04" or head[:3] == b"\x80\x02\x8a":
        what = "one weight file of a Hugging Face checkpoint"
    else:
        return
    raise CheckpointError(
        f"{path}: {what}, not a model: pass a checkpoint directory (here {path.parent}) "
        "or a llama2.c .bin file"
    )


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
        not_llama2c(path)
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
        not_llama2c(path)
        fmt = weights or "float32"
        cfg, params = read_llama2c(path, weight_format(fmt), group)
        return Checkpoint(cfg, params, "llama2c", source=str(path), weights=fmt)
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint?)")
    hf = read_json(config_path)
    family = detect(hf)
    cfg = family.config_from_hf(hf)
    eos, bos = special_ids(path, hf, cfg.vocab)
    tok = load_tokenizer(path, hf) if tokenizer else None
    if tok is not None:
        check_tokenizer(tok, cfg)
        eos = eos or tuple(tok.eos_ids)
    with read_tensors(path) as tensors:  # the weights last: every check above reads no data
        fmt = weights or native_format(hf, tensors)
        params = convert(family, cfg, tensors, weight_format(fmt), group, progress)
    return Checkpoint(cfg, params, family.name, tok, eos, bos, str(path), hf, fmt)
