"""Text to token ids and back for every model family slimllm runs, without transformers.

A checkpoint's tokenizer comes in one of four shapes: a HF fast `tokenizer.json` (loaded with
`tokenizers`), a SentencePiece model (`tokenizer.model`, ChatGLM-6B's `ice_text.model`), a tiktoken
rank file (Qwen v1's `qwen.tiktoken`, GLM-4's `tokenizer.model`) or a byte-level BPE
`vocab.json` + `merges.txt` pair (Qwen2, OPT/GPT-2). Several of these upstream tokenizers are
remote code (`tokenization_chatglm.py`, `tokenization_qwen.py`, `tokenization_baichuan.py`), so
their behaviour is re-implemented from reading those files: `tokenizer_files` reads the files,
`tokenizer_backends` encodes and decodes (specials numbered after the base vocabulary, ChatGLM-6B's
newline/tab/blank-run rewriting, NFC normalisation, split patterns), and this module is the
public `Tokenizer` with its prompt wrapping. Each family file declares its facts in a
`TokenizerRule` (`weights.families`). `load_tokenizer` picks the shape from the files present (by
content, not only by name) and the family from tokenizer_config.json / config.json and the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .families import FAMILIES
from .families.common import TokenizerRule
from .tokenizer_backends import Backend, SentencePieceBackend, TiktokenBackend, TokenizersBackend
from .tokenizer_files import (  # TokenizerError is defined there, beside the readers raising it
    TokenizerError,
    added_tokens,
    ids_of,
    is_tiktoken_text,
    load_ranks,
    load_sentencepiece,
    load_tokenizer_json,
    load_vocab_merges,
    read_json,
    token_text,
)

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer"]


# Tokenizers of models no family covers. GPT-2's byte-level BPE is also how a vocab.json +
# merges.txt reads when no family's rule does; "generic" adds nothing of its own.
_GPT2 = TokenizerRule(
    model_types=("gpt2",),
    classes=("gpt2tokenizer",),
    kinds=("bpe-vocab-merges",),
    default_for=("bpe-vocab-merges",),
    bos="<|endoftext|>",
    eos=("<|endoftext|>",),
)
Named = tuple[str, TokenizerRule]
_GENERIC: Named = ("generic", TokenizerRule())
_RULES = [*((family.name, family.tokenizer) for family in FAMILIES), ("gpt2", _GPT2)]
# SentencePiece model files whose name alone says the family (ChatGLM-6B's ice_text.model).
_SENTENCEPIECE_FILES = {r.sentencepiece_file: (n, r) for n, r in _RULES if r.sentencepiece_file}


class Tokenizer:
    """Encodes prompts and decodes generated ids the way the family's upstream tokenizer does."""

    def __init__(
        self,
        backend: Backend,
        family: str,
        bos_id: int | None,
        eos_ids: tuple[int, ...],
        prefix_ids: tuple[int, ...],
        suffix_ids: tuple[int, ...],
    ) -> None:
        self._backend = backend
        self.kind: str = backend.kind
        self.family: str = family
        self.path: Path = backend.path
        self.vocab_size: int = backend.vocab_size
        self.special: dict[str, int] = dict(backend.special)
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.prefix_ids = prefix_ids
        self.suffix_ids = suffix_ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, family={self.family!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, path={str(self.path)!r})"
        )

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; add_special wraps them in the family's prompt prefix/suffix."""
        ids = self._backend.encode(text)
        if add_special:
            return [*self.prefix_ids, *ids, *self.suffix_ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary (padded embedding rows) decode to nothing."""
        return self._backend.decode([int(i) for i in ids], skip_special)

    def decode_stream(
        self, ids: Sequence[int], printed: str, *, skip_special: bool = True, final: bool = False
    ) -> str:
        """New text to show after `printed`, given all ids so far; pieces add up to decode(ids).

        A character whose UTF-8 bytes are not all generated yet waits for them (or for `final`).
        """
        text = self.decode(ids, skip_special)
        if not final:
            # U+FFFD at the end is a character whose remaining bytes have not been generated yet.
            text = text.rstrip("\ufffd")
        # The decoders here only ever extend earlier output, so `printed` is a prefix of `text`.
        return text[len(printed) :]

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (byte-level form for tiktoken), None if unknown."""
        return self._backend.id_to_piece(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry or special token, None if there is none."""
        return self._backend.token_to_id(token)


def _named_families(tokenizer_config: dict[str, Any], config: dict[str, Any]) -> list[Named]:
    """The families config.json's model_type names, else those tokenizer_config's class names.

    model_type wins over tokenizer_class: OPT ships GPT2Tokenizer, for example.
    """
    model_type = str(config.get("model_type") or "").lower()
    by_type = [(name, rule) for name, rule in _RULES if model_type in rule.model_types]
    if by_type:
        return by_type
    cls = str(tokenizer_config.get("tokenizer_class") or "").lower().removesuffix("fast")
    return [(name, rule) for name, rule in _RULES if cls in rule.classes]


def _reads(named: list[Named], kind: str, model: Any = None) -> Named | None:
    """The first named family whose rule reads this kind of file (tokenizer.json: any rule).

    A rule with `own_piece` reads only a SentencePiece `model` that holds that piece itself.
    """
    for name, rule in named:
        if kind in rule.kinds or kind == "tokenizers-json":
            if rule.own_piece is None or (
                model is not None and model.PieceToId(rule.own_piece) != model.unk_id()
            ):
                return name, rule
    return None


def _default(kind: str) -> Named:
    """The rule a file of this kind is read with when no config names a family."""
    return next(((n, r) for n, r in _RULES if kind in r.default_for), _GENERIC)


def _first_file(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def load_tokenizer(directory: str | Path, config: dict[str, Any] | None = None) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None when the directory holds no tokenizer file.

    `config` is the model's config.json (read from the directory when None); the family comes
    from it or tokenizer_config.json (`_named_families`) and from the file found (`_reads`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: not a directory")
    tokenizer_config = read_json(directory / "tokenizer_config.json")
    special_map = read_json(directory / "special_tokens_map.json")
    generation_config = read_json(directory / "generation_config.json")
    if config is None:
        config = read_json(directory / "config.json")
    named = _named_families(tokenizer_config, config)
    added, specials = added_tokens(tokenizer_config, special_map, directory)

    backend: Backend
    tokenizer_json = _first_file(directory, ["tokenizer.json"])
    tiktoken_file = _first_file(directory, ["qwen.tiktoken"]) or next(
        iter(sorted(directory.glob("*.tiktoken"))), None
    )
    sp_file = _first_file(directory, [*_SENTENCEPIECE_FILES, "tokenizer.model", "spiece.model"])
    vocab_json = _first_file(directory, ["vocab.json"])
    merges_txt = _first_file(directory, ["merges.txt"])

    if tokenizer_json is not None:
        backend = load_tokenizer_json(tokenizer_json)
        name, rule = _reads(named, "tokenizers-json") or _GENERIC
    elif tiktoken_file is not None or (sp_file is not None and is_tiktoken_text(sp_file)):
        path = tiktoken_file or sp_file
        assert path is not None
        ranks = load_ranks(path)
        found = _reads(named, "tiktoken")
        if not named:  # no config names a family: the number of ranks may
            found = next(((n, r) for n, r in _RULES if r.tiktoken_size == len(ranks)), None)
        if found is None:
            raise TokenizerError(
                f"{path}: tiktoken rank file but no known tokenizer family for it "
                f"(tokenizer_class={tokenizer_config.get('tokenizer_class')!r}, "
                f"model_type={config.get('model_type')!r}); its split pattern is unknown"
            )
        name, rule = found
        backend = TiktokenBackend(path, ranks, rule)
    elif sp_file is not None:
        model = load_sentencepiece(sp_file)
        name, rule = (
            _SENTENCEPIECE_FILES.get(sp_file.name)
            or _reads(named, "sentencepiece", model)
            or (_GENERIC if named else _default("sentencepiece"))
        )
        backend = SentencePieceBackend(sp_file, model, rule, added)
    elif vocab_json is not None and merges_txt is not None:
        name, rule = _reads(named, "bpe-vocab-merges") or _default("bpe-vocab-merges")
        backend = load_vocab_merges(vocab_json, merges_txt, rule, added, specials)
    else:
        return None
    return _assemble(backend, name, rule, tokenizer_config, special_map, generation_config, config)


def _assemble(
    backend: Backend,
    name: str,
    rule: TokenizerRule,
    tokenizer_config: dict[str, Any],
    special_map: dict[str, Any],
    generation_config: dict[str, Any],
    config: dict[str, Any],
) -> Tokenizer:
    def id_of(text: str | None) -> int | None:
        return None if text is None else backend.token_to_id(text)

    def required(texts: tuple[str, ...]) -> tuple[int, ...]:
        ids = tuple(id_of(t) for t in texts)
        missing = [t for t, i in zip(texts, ids, strict=True) if i is None]
        if missing:
            raise TokenizerError(f"{backend.path}: {name} tokenizer lacks special tokens {missing}")
        return ids  # type: ignore[return-value]

    def configured(key: str) -> tuple[bool, str | None]:
        """(whether a config names the token at all, its text); an explicit null counts."""
        for source in (tokenizer_config, special_map):
            if key in source:
                return True, token_text(source[key])
        return False, None

    named, bos_text = configured("bos_token")
    bos_id = id_of(bos_text if named else rule.bos)
    _, eos_text = configured("eos_token")
    eos_id = id_of(eos_text)

    if isinstance(backend, TokenizersBackend) and backend.kind == "tokenizers-json":
        # tokenizer.json's post-processor says what wraps a text; an explicit add_bos_token or
        # add_eos_token overrides it, as transformers rebuilds the post-processor from them.
        prefix, suffix = backend.wrapping()
        add_bos = tokenizer_config.get("add_bos_token", bos_id is not None and bos_id in prefix)
        add_eos = tokenizer_config.get("add_eos_token", eos_id is not None and eos_id in suffix)
        prefix = tuple(i for i in prefix if i != bos_id)
        suffix = tuple(i for i in suffix if i != eos_id)
    else:
        prefix, suffix = required(rule.prefix), required(rule.suffix)
        add_bos = tokenizer_config.get("add_bos_token", rule.add_bos)
        add_eos = tokenizer_config.get("add_eos_token", False)
    if add_bos and bos_id is not None:
        prefix = (bos_id, *prefix)
    if add_eos and eos_id is not None:
        suffix = (*suffix, eos_id)

    candidates = [
        *ids_of(generation_config.get("eos_token_id")),
        *ids_of(config.get("eos_token_id")),
        eos_id,
        *(id_of(t) for t in rule.eos),
    ]
    eos_ids = tuple(
        dict.fromkeys(i for i in candidates if i is not None and 0 <= i < backend.vocab_size)
    )
    return Tokenizer(backend, name, bos_id, eos_ids, prefix, suffix)
