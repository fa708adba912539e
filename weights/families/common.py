"""What a family file declares (`Family`, `TokenizerRule`) and helpers to read hub configs strictly.

A `Family` names its tensors with `{i}` for the layer index: `names` maps a canonical parameter
("layers.{i}.wq") to one checkpoint tensor, `fused` maps one checkpoint tensor to a function
that splits it into several canonical parameters, `transforms` post-process a canonical
parameter (after it is in slimllm's `[in, out]` layout), and `ignored` lists checkpoint tensors
that are read and deliberately unused (e.g. cached rotary frequencies); `weights.convert`
applies them, and `weights.transforms` holds the maths. Its `tokenizer` rule tells
`weights.tokenizer` how to recognise the family's tokenizer and what that tokenizer puts around
a prompt, so that a family name means the same thing to the loader and to the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from slimllm.reference.config import ModelConfig, WavelengthScaling

from ..io import CheckpointError

TOKENIZER_KINDS = ("sentencepiece", "tiktoken", "bpe-vocab-merges")


@dataclass(frozen=True)
class TokenizerRule:
    """How a family's tokenizer is recognised, what it puts around a prompt, which specials count.

    Recognition (`weights.tokenizer.load_tokenizer`): the families whose `model_types` hold
    config.json's model_type (else whose `classes` hold tokenizer_config's tokenizer_class), in
    registry order; the first of them whose rule reads the tokenizer file found wins.
    """

    model_types: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # lower case, without a "Fast" suffix
    kinds: tuple[str, ...] = ()  # file kinds it reads (of TOKENIZER_KINDS); tokenizer.json: any
    own_piece: str | None = None  # read only a SentencePiece model holding this piece itself
    sentencepiece_file: str | None = None  # a model file of this name is ours, whatever configs say
    default_for: tuple[str, ...] = ()  # file kinds it reads when no config names a family
    tiktoken_size: int = 0  # the base rank count that names the family when no config does
    prefix: tuple[str, ...] = ()  # put before the text by encode(add_special=True)
    suffix: tuple[str, ...] = ()  # put after it
    bos: str | None = None  # default bos token when the configs name none
    add_bos: bool = False  # default of tokenizer_config's add_bos_token (prefixes bos)
    eos: tuple[str, ...] = ()  # tokens that end generation besides the configured ones
    appended: tuple[str, ...] = ()  # specials numbered right after the base vocabulary
    in_text: tuple[str, ...] | None = None  # specials recognised in typed text (None: all)
    pattern: str | None = None  # pre-tokenizer split pattern (tiktoken needs one)
    nfc: bool = False  # NFC-normalise text before encoding
    blanks: bool = False  # ChatGLM-6B's "\n" -> <n>, "\t" -> <|tab|>, space runs -> <|blank_N|>

    def __post_init__(self):
        unknown = set(self.kinds + self.default_for) - set(TOKENIZER_KINDS)
        if unknown:
            raise ValueError(f"unknown tokenizer file kinds {sorted(unknown)}")
        if "tiktoken" in self.kinds and not self.pattern:
            raise ValueError("a tokenizer rule that reads tiktoken files needs a split pattern")


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[dict], bool]  # does a hub config.json belong to this family?
    config_from_hf: Callable[[dict], ModelConfig]
    names: dict[str, str]  # canonical -> checkpoint name
    fused: dict[str, Callable] = field(default_factory=dict)  # checkpoint -> fn(w, cfg) -> dict
    transforms: dict[str, Callable] = field(default_factory=dict)  # canonical -> fn(w, cfg)
    ignored: tuple[str, ...] = ()
    rename: Callable[[str], str] | None = None  # normalise checkpoint names (e.g. drop a prefix)
    tokenizer: TokenizerRule = TokenizerRule()


def require(hf: dict, *keys):
    """The first of `keys` present in the hub config, else a clear error."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise CheckpointError(f"config.json lacks {' or '.join(keys)}")


def expect(hf: dict, key: str, allowed, default=None):
    """A config value that slimllm supports only in the listed forms."""
    value = hf.get(key, default)
    if value not in allowed:
        raise CheckpointError(
            f"config.json {key}={value!r} is not supported (supported: {allowed})"
        )
    return value


def rope_settings(hf: dict) -> tuple[float, WavelengthScaling | None]:
    """(rope_theta, rope_scaling) from either the classic keys or the newer `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    source = params if params.get("rope_type") else scaling
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), WavelengthScaling(
            float(source["factor"]),
            float(source["low_freq_factor"]),
            float(source["high_freq_factor"]),
            int(source["original_max_position_embeddings"]),
        )
    raise CheckpointError(f"config.json rope scaling type {kind!r} is not supported")


def eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)
