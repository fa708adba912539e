"""What a family file declares (`Family`, `TokenizerRule`) and helpers to read hub configs strictly.

A `Family` names its tensors with `{i}` for the layer index: `names` maps a canonical parameter
("layers.{i}.wq") to one checkpoint tensor, `fused` maps one checkpoint tensor to a function
that splits it into several canonical parameters, `transforms` post-process a canonical
parameter (after it is in slimllm's `[in, out]` layout), and `ignored` lists checkpoint tensors
that are read and deliberately unused (e.g. cached rotary frequencies); `weights.convert`
applies them, and `weights.transforms` holds the maths. Its `tokenizer` rule tells
`weights.tokenizer` how to recognise the family's tokenizer and what that tokenizer puts around
a prompt, so that a family name means the same thing to the loader and to the tokenizer.

A family reads its hub config through `integer`, `number`, `flag` and `expect`, which check a
value's type and range and name its config.json key in the error (`HubConfigError`, a
`ConfigError`); `hub_config` wraps each `config_from_hf` to refuse what no family runs
(sliding-window attention) and to mark the ModelConfig's own range errors as config.json's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from slimllm.reference import config
from slimllm.reference.config import ModelConfig, WavelengthScaling
from slimllm.reference.errors import ConfigError

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


class HubConfigError(ConfigError, CheckpointError):
    """A config.json value slimllm cannot run: a config error, raised where the checkpoint's
    other errors are (so it is a CheckpointError too)."""


REQUIRED = object()  # a `default` that makes a key required


def hub_config(config_from_hf: Callable[[dict], ModelConfig]) -> Callable[[dict], ModelConfig]:
    """A family's `config_from_hf`, strict: the hub config must be a JSON object, must not ask
    for sliding-window attention, and every range error of the ModelConfig it builds is a
    HubConfigError saying it comes from config.json."""

    @functools.wraps(config_from_hf)
    def strict(hf: dict) -> ModelConfig:
        json_object(hf)
        no_sliding_window(hf)
        try:
            return config_from_hf(hf)
        except HubConfigError:
            raise
        except ConfigError as e:
            raise HubConfigError(f"config.json: {e}") from None

    return strict


def json_object(hf) -> dict:
    if not isinstance(hf, dict):
        raise HubConfigError(f"config.json is a JSON {type(hf).__name__}, expected an object")
    return hf


def architectures(hf: dict) -> list:
    """config.json's `architectures` list (anything else: none)."""
    names = hf.get("architectures")
    return names if isinstance(names, list) else []


def value(hf: dict, keys: tuple[str, ...], default, where: str = "config.json"):
    """(name, value) of the first of `keys` present (null counts as absent), else the default;
    the name says where the key is (`where`: config.json or one of its objects)."""
    present = [key for key in keys if hf.get(key) is not None]
    if not present and default is REQUIRED:
        raise HubConfigError(f"{where} lacks {' or '.join(keys)}")
    key = (present or keys)[0]
    name = f"{where} {key}" if where == "config.json" else f"{where}.{key}"
    return name, hf[key] if present else default


def require(hf: dict, *keys):
    """The first of `keys` present in the hub config, else a clear error."""
    return value(hf, keys, REQUIRED)[1]


def checked(check, hf: dict, keys, default, where, *bounds):
    """A config value passed through one of reference.config's checks (None: absent, no
    default), its error raised as a HubConfigError."""
    name, v = value(hf, keys, default, where)
    if v is None:
        return None
    try:
        return check(name, v, *bounds)
    except ConfigError as e:
        raise HubConfigError(str(e)) from None


def integer(hf, *keys, default=REQUIRED, low=1, high=config.MAX_SIZE, where="config.json"):
    """An integer config value in [low, high] (a bool, a float or a string is an error)."""
    return checked(config.integer, hf, keys, default, where, low, high)


def number(hf, *keys, default=REQUIRED, low=0.0, high=config.MAX_FLOAT, where="config.json"):
    """A finite number config value in (low, high], as a float."""
    v = checked(config.number, hf, keys, default, where, low, high)
    return None if v is None else float(v)


def flag(hf: dict, key: str, default: bool | None = False) -> bool:
    """A true/false config value (0, 1 or "false" are errors: "false" would read as true)."""
    return checked(config.boolean, hf, (key,), default, "config.json")


def head_dim(hf: dict, width: int, heads: int, key: str | None = "head_dim") -> int:
    """The head dim the config gives (`key`, if the family reads one), else the width split
    evenly over the heads."""
    if key and hf.get(key) is not None:
        return integer(hf, key)
    if width % heads:
        raise HubConfigError(
            f"config.json hidden_size={width} is not a multiple of num_attention_heads={heads}"
        )
    return width // heads


def expect(hf: dict, key: str, allowed, default=None):
    """A config value that slimllm supports only in the listed forms."""
    v = hf.get(key, default)
    if type(v) not in {type(a) for a in allowed} or v not in allowed:  # 1 == True: not allowed
        raise HubConfigError(
            f"config.json {key}={config.shown(v)} is not supported (supported: {allowed})"
        )
    return v


def no_sliding_window(hf: dict):
    """Refuse sliding-window attention (slimllm attends to the whole context), whichever way a
    config asks for it: Qwen2's `use_sliding_window`, Mistral's `sliding_window` alone (no such
    switch), or `layer_types`. A window that covers the whole context changes nothing."""
    asked = flag(hf, "use_sliding_window", default=None)
    window = integer(hf, "sliding_window", default=None) if asked is not False else None
    longest = integer(hf, "max_position_embeddings", "seq_length", default=None)
    if (asked or window is not None) and not (window and longest and window >= longest):
        said = f"sliding_window={window}" if window else "use_sliding_window=true"
        raise HubConfigError(
            f"config.json {said} (context {longest}): sliding-window attention is not supported"
        )
    kinds = hf.get("layer_types")
    if kinds is not None and (
        not isinstance(kinds, list) or any(kind != "full_attention" for kind in kinds)
    ):
        raise HubConfigError(
            f"config.json layer_types={config.shown(kinds)}: kinds other than full_attention are "
            "not supported"
        )


# Keys of a rope settings object: the type, the base, and what each scaling type reads.
ROPE_KEYS = {
    "default": ("rope_type", "type", "rope_theta"),
    "llama3": (
        "rope_type", "type", "rope_theta",
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
    ),
}  # fmt: skip


def rope_settings(hf: dict) -> tuple[float, WavelengthScaling | None]:
    """(rope_theta, rope_scaling) from either the classic keys or the newer `rope_parameters`;
    a key the rope type does not read is an error (it would change the frequencies)."""
    params = rope_object(hf, "rope_parameters")
    scaling = rope_object(hf, "rope_scaling")
    where, source = (
        ("config.json rope_parameters", params)
        if params.get("rope_type")
        else ("config.json rope_scaling", scaling)
    )
    kind = source.get("rope_type") or source.get("type") or "default"
    if not isinstance(kind, str) or kind not in ROPE_KEYS:
        raise HubConfigError(f"config.json rope scaling type {config.shown(kind)} is not supported")
    for name, settings in (("rope_parameters", params), ("rope_scaling", scaling)):
        unknown = sorted(set(settings) - set(ROPE_KEYS[kind]))
        if unknown:
            raise HubConfigError(
                f"config.json {name} has {config.shown(unknown)}: not read for rope type {kind!r}"
            )
    theta = (
        number(params, "rope_theta", low=1.0, where="config.json rope_parameters")
        if "rope_theta" in params
        else number(hf, "rope_theta", default=10000.0, low=1.0)
    )
    if kind == "default":
        return theta, None
    return theta, WavelengthScaling(
        number(source, "factor", where=where),
        number(source, "low_freq_factor", where=where),
        number(source, "high_freq_factor", where=where),
        integer(source, "original_max_position_embeddings", where=where),
    )


def rope_object(hf: dict, key: str) -> dict:
    """A rope settings object (absent or null: empty)."""
    v = hf.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise HubConfigError(f"config.json {key}={config.shown(v)}: expected an object or null")
    return v
