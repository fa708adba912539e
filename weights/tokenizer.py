"""Text to token ids and back for every model family slimllm runs, without transformers.

A checkpoint's tokenizer comes in one of four shapes: a HF fast `tokenizer.json` (loaded with
`tokenizers`), a SentencePiece model (`tokenizer.model`, ChatGLM-6B's `ice_text.model`), a tiktoken
rank file (Qwen v1's `qwen.tiktoken`, GLM-4's `tokenizer.model`) or a byte-level BPE
`vocab.json` + `merges.txt` pair (Qwen2, OPT/GPT-2). Several of these upstream tokenizers are
remote code (`tokenization_chatglm.py`, `tokenization_qwen.py`, `tokenization_baichuan.py`), so
their behaviour is re-implemented from reading those files: this module holds the machinery
(specials numbered after the base vocabulary, ChatGLM-6B's newline/tab/blank-run rewriting, NFC
normalisation, split patterns, prompt wrapping) and each family file declares its facts in a
`TokenizerRule` (`weights.families`). `load_tokenizer` picks the shape from the files present (by
content, not only by name) and the family from tokenizer_config.json / config.json and the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from .families import FAMILIES
from .families.common import TokenizerRule

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer file is corrupt, unsupported or inconsistent with its configuration."""


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


class _Backend(Protocol):
    kind: str
    path: Path
    vocab_size: int
    special: dict[str, int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool) -> str: ...
    def id_to_piece(self, token_id: int) -> str | None: ...
    def token_to_id(self, token: str) -> int | None: ...


class Tokenizer:
    """Encodes prompts and decodes generated ids the way the family's upstream tokenizer does."""

    def __init__(
        self,
        backend: _Backend,
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


# --------------------------------------------------------------------------------- backends


def _splitter(specials: dict[str, int]) -> Callable[[str], Iterator[tuple[str, int | None]]]:
    """Cuts text into (chunk, None) and (special token, id) parts, longest special first."""
    if not specials:
        return lambda text: iter([(text, None)])
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def split(text: str) -> Iterator[tuple[str, int | None]]:
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                yield text[start : match.start()], None
            yield match.group(), specials[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:], None

    return split


_BLANK_RUN = re.compile(" {2,80}")
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")


class _SentencePieceBackend:
    kind = "sentencepiece"

    def __init__(self, path: Path, model: Any, rule: TokenizerRule, added: dict[str, int]) -> None:
        self.path = path
        self._sp = model
        self._base = model.get_piece_size()
        self._blanks = rule.blanks
        everything = list(range(self._base))
        # Control and unknown pieces (<s>, </s>, <unk>, ChatGLM-6B's [gMASK] ...) never come out of
        # encoding text; with the specials appended after the vocabulary they are what
        # decode(skip_special=True) drops.
        flags = zip(
            everything, model.IsControl(everything), model.IsUnknown(everything), strict=True
        )
        special = {model.IdToPiece(i): i for i, control, unknown in flags if control or unknown}
        for offset, token in enumerate(rule.appended):
            special[token] = self._base + offset
        self.special = special
        self.vocab_size = self._base + len(rule.appended)
        self._text_of = {i: t for t, i in special.items()}
        wanted = special if rule.in_text is None else rule.in_text
        in_text = {t: special[t] for t in wanted if t in special}
        in_text.update({t: i for t, i in added.items() if 0 <= i < self.vocab_size})
        self._split = _splitter(in_text)

    def _prepare(self, text: str) -> str:
        if not self._blanks:
            return text
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return _BLANK_RUN.sub(lambda m: f"<|blank_{len(m.group())}|>", text)

    def _restore(self, text: str) -> str:
        if not self._blanks:
            return text
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_TOKEN.sub(
            lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= 80 else m.group(), text
        )

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # Each chunk between specials gets SentencePiece's dummy-prefix space, as in upstream
        # ChatGLM3 (encode_special_tokens), Baichuan and Llama's legacy mode.
        for chunk, special_id in self._split(text):
            if special_id is not None:
                ids.append(special_id)
            else:
                ids.extend(self._sp.encode(self._prepare(chunk)))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._text_of:
                if skip_special:
                    continue  # the text around a dropped special decodes as one run
                if run:
                    parts.append(self._restore(self._sp.decode(run)))
                    run = []
                parts.append(self._text_of[i])
            elif 0 <= i < self._base:
                run.append(i)
        if run:
            parts.append(self._restore(self._sp.decode(run)))
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str | None:
        if token_id in self._text_of:
            return self._text_of[token_id]
        return self._sp.IdToPiece(token_id) if 0 <= token_id < self._base else None

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        token_id = self._sp.PieceToId(token)
        # PieceToId answers the unk id for anything it does not know.
        return token_id if self._sp.IdToPiece(token_id) == token else None


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte (byte-level BPE vocabularies use it)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = (b for b in range(256) if b not in keep)
    table = {b: chr(b) for b in keep} | {b: chr(0x100 + n) for n, b in enumerate(moved)}
    return [table[b] for b in range(256)]


_BYTE_CHARS = _byte_alphabet()
_CHAR_BYTES = {c: b for b, c in enumerate(_BYTE_CHARS)}


class _TiktokenBackend:
    kind = "tiktoken"

    def __init__(self, path: Path, ranks: dict[bytes, int], rule: TokenizerRule) -> None:
        # On use: ~20 ms to import, and a checkpoint needs one library of three.
        import tiktoken

        self.path = path
        base = max(ranks.values()) + 1
        # Qwen numbers its specials from 151643 and GLM-4 from len(ranks): both are max rank + 1.
        self.special = {token: base + n for n, token in enumerate(rule.appended)}
        self.vocab_size = base + len(rule.appended)
        self._nfc = rule.nfc
        self._enc = tiktoken.Encoding(
            name=f"slimllm-{path.name}",
            pat_str=rule.pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special,
        )
        # Qwen encodes with allowed_special="all"; GLM-4's specials are HF added tokens, which the
        # HF layer splits out of text before its tiktoken sees it. Both: every special is live.
        self._allowed = set(self.special)
        self._ranks = ranks
        self._bytes: list[bytes | None] = [None] * base
        for token, rank in ranks.items():
            self._bytes[rank] = token
        self._text_of = {i: t for t, i in self.special.items()}

    def encode(self, text: str) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special=self._allowed, disallowed_special=())

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        chunks: list[bytes] = []
        for i in ids:
            if 0 <= i < len(self._bytes):
                chunks.append(self._bytes[i] or b"")
            elif not skip_special and i in self._text_of:
                chunks.append(self._text_of[i].encode())
        # Qwen decodes with errors="replace" too.
        return b"".join(chunks).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str | None:
        if token_id in self._text_of:
            return self._text_of[token_id]
        if 0 <= token_id < len(self._bytes) and self._bytes[token_id] is not None:
            return "".join(_BYTE_CHARS[b] for b in self._bytes[token_id])
        return None

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        if all(c in _CHAR_BYTES for c in token):
            token_id = self._ranks.get(bytes(_CHAR_BYTES[c] for c in token))
            if token_id is not None:
                return token_id
        return self._ranks.get(token.encode("utf-8"))


class _TokenizersBackend:
    def __init__(self, path: Path, tokenizer: Any, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self.special = {t.content: i for i, t in sorted(added.items()) if t.special}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        known = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def wrapping(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids tokenizer.json's post-processor puts before and after a text."""
        bare = self._tok.encode("x", add_special_tokens=False).ids
        full = self._tok.encode("x", add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return tuple(full[:start]), tuple(full[start + len(bare) :])
        return (), ()


# ---------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read as JSON ({err})") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special-token entry of a tokenizer config: a string or an AddedToken-style dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids_of(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _added_tokens(
    tokenizer_config: dict[str, Any], special_map: dict[str, Any], directory: Path
) -> tuple[dict[str, int], set[str]]:
    """Tokens a HF tokenizer adds on top of its vocabulary file, and which of them are special.

    HF splits every added token out of typed text before the model tokenizer sees it.
    """
    added: dict[str, int] = {}
    special: set[str] = set()
    for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is not None and str(key).isdigit():
            added[text] = int(key)
            if isinstance(entry, dict) and entry.get("special", True):
                special.add(text)
    for text, token_id in _read_json(directory / "added_tokens.json").items():
        if isinstance(token_id, int):
            added.setdefault(text, token_id)
    for source in (tokenizer_config, special_map):
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(source.get(key))
            if text:
                special.add(text)
        for entry in source.get("additional_special_tokens") or []:
            text = _token_text(entry)
            if text:
                special.add(text)
    return added, special


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


def _is_tiktoken_text(path: Path) -> bool:
    """Whether a file starts like a tiktoken rank file ("<base64 token> <rank>" lines)."""
    with path.open("rb") as f:
        first = f.readline(512).rstrip(b"\r\n")
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} \d+", first) is not None


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as err:
            raise TokenizerError(f"{path}: bad tiktoken rank line {number} ({err})") from err
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken rank file")
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: tiktoken rank file repeats ranks")
    return ranks


def _load_sentencepiece(path: Path) -> Any:
    # On use: ~20 ms to import, and a checkpoint needs one library of three.
    import sentencepiece

    data = path.read_bytes()
    if not data:
        raise TokenizerError(f"{path}: empty file")
    try:
        model = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, ValueError) as err:
        raise TokenizerError(
            f"{path}: neither a SentencePiece model nor a tiktoken rank file ({err})"
        ) from err
    if model.get_piece_size() == 0:
        raise TokenizerError(f"{path}: SentencePiece model without pieces")
    return model


def _load_tokenizer_json(path: Path) -> _TokenizersBackend:
    # On use: ~20 ms to import, and a checkpoint needs one library of three.
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as err:  # the Rust side raises a bare Exception for any parse problem
        raise TokenizerError(f"{path}: not a valid tokenizers file ({err})") from err
    return _TokenizersBackend(path, tokenizer, "tokenizers-json")


def _load_vocab_merges(
    vocab_path: Path,
    merges_path: Path,
    rule: TokenizerRule,
    added: dict[str, int],
    specials: set[str],
) -> _TokenizersBackend:
    # On use: ~20 ms to import, and a checkpoint needs one library of three.
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = _read_json(vocab_path)
    if not vocab or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_path}: expected a JSON object of token -> id")
    merges: list[tuple[str, str]] = []
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{merges_path}: cannot read ({err})") from err
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{merges_path}: line {number} is not a merge pair: {line!r}")
        merges.append((pair[0], pair[1]))
    # Added tokens go into the vocabulary first so they keep the ids the config gives them.
    vocab = {**vocab, **{t: i for t, i in added.items() if t not in vocab}}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    if rule.pattern:  # Qwen2: NFC, split with its pattern, then bytes -> printable chars
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(rule.pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2 / OPT
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # In id order, so that tokenizers never has to number one itself.
    for text in sorted((set(added) | specials) & set(vocab), key=vocab.__getitem__):
        if text in specials:
            tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        else:
            tokenizer.add_tokens([AddedToken(text, normalized=False)])
    return _TokenizersBackend(vocab_path, tokenizer, "bpe-vocab-merges")


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
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    generation_config = _read_json(directory / "generation_config.json")
    if config is None:
        config = _read_json(directory / "config.json")
    named = _named_families(tokenizer_config, config)
    added, specials = _added_tokens(tokenizer_config, special_map, directory)

    backend: _Backend
    tokenizer_json = _first_file(directory, ["tokenizer.json"])
    tiktoken_file = _first_file(directory, ["qwen.tiktoken"]) or next(
        iter(sorted(directory.glob("*.tiktoken"))), None
    )
    sp_file = _first_file(directory, [*_SENTENCEPIECE_FILES, "tokenizer.model", "spiece.model"])
    vocab_json = _first_file(directory, ["vocab.json"])
    merges_txt = _first_file(directory, ["merges.txt"])

    if tokenizer_json is not None:
        backend = _load_tokenizer_json(tokenizer_json)
        name, rule = _reads(named, "tokenizers-json") or _GENERIC
    elif tiktoken_file is not None or (sp_file is not None and _is_tiktoken_text(sp_file)):
        path = tiktoken_file or sp_file
        assert path is not None
        ranks = _load_ranks(path)
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
        backend = _TiktokenBackend(path, ranks, rule)
    elif sp_file is not None:
        model = _load_sentencepiece(sp_file)
        name, rule = (
            _SENTENCEPIECE_FILES.get(sp_file.name)
            or _reads(named, "sentencepiece", model)
            or (_GENERIC if named else _default("sentencepiece"))
        )
        backend = _SentencePieceBackend(sp_file, model, rule, added)
    elif vocab_json is not None and merges_txt is not None:
        name, rule = _reads(named, "bpe-vocab-merges") or _default("bpe-vocab-merges")
        backend = _load_vocab_merges(vocab_json, merges_txt, rule, added, specials)
    else:
        return None
    return _assemble(backend, name, rule, tokenizer_config, special_map, generation_config, config)


def _assemble(
    backend: _Backend,
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
                return True, _token_text(source[key])
        return False, None

    named, bos_text = configured("bos_token")
    bos_id = id_of(bos_text if named else rule.bos)
    _, eos_text = configured("eos_token")
    eos_id = id_of(eos_text)

    if isinstance(backend, _TokenizersBackend) and backend.kind == "tokenizers-json":
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
        *_ids_of(generation_config.get("eos_token_id")),
        *_ids_of(config.get("eos_token_id")),
        eos_id,
        *(id_of(t) for t in rule.eos),
    ]
    eos_ids = tuple(
        dict.fromkeys(i for i in candidates if i is not None and 0 <= i < backend.vocab_size)
    )
    return Tokenizer(backend, name, bos_id, eos_ids, prefix, suffix)
