"""The three encoders behind `Tokenizer`: SentencePiece, tiktoken and the `tokenizers` library.

Each backend turns text into ids and back for one kind of vocabulary file and answers the same
questions (`Backend`): vocabulary size with specials, the special tokens, a piece's id. The
remote-code tokenizers are re-implemented from reading them: `SentencePieceBackend` numbers a
family's extra specials after the base vocabulary and does ChatGLM-6B's newline/tab/blank-run
rewriting (`tokenization_chatglm.py`), encoding the text between specials as ChatGLM3 and
Baichuan do (`tokenization_baichuan.py`); `TiktokenBackend` encodes as Qwen v1's
`tokenization_qwen.py` does (NFC when the rule asks, every special live, specials numbered after
the last rank) and shows pieces in GPT-2's printable byte alphabet (`bytes_to_unicode` in GPT-2's
`encoder.py`); `TokenizersBackend` wraps a `tokenizers` tokenizer. `tokenizer_files` reads the
files these are built from.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from .families.common import TokenizerRule

__all__ = ["Backend", "SentencePieceBackend", "TiktokenBackend", "TokenizersBackend"]


class Backend(Protocol):
    """What `Tokenizer` asks of an encoder; the three classes below answer it."""

    kind: str
    path: Path
    vocab_size: int  # one past the largest id it can produce, specials included
    special: dict[str, int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool) -> str: ...
    def id_to_piece(self, token_id: int) -> str | None: ...
    def token_to_id(self, token: str) -> int | None: ...


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


class SentencePieceBackend:
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


class TiktokenBackend:
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


class TokenizersBackend:
    def __init__(self, path: Path, tokenizer: Any, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._tok = tokenizer
        # One past the largest id: get_vocab_size counts entries, and added tokens may have ids
        # past a gap (a vocabulary 0..3 plus "<x>": 1000 has 5 entries and produces id 1000).
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
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
