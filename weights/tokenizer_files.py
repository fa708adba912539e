"""Reading a checkpoint's tokenizer files: the JSON configs and the four vocabulary formats.

The configs (tokenizer_config.json, special_tokens_map.json, added_tokens.json) give the added
and special tokens; a token entry is a string or an AddedToken-style dict, and added tokens keep
the ids the config gives them. The vocabulary files are a tiktoken rank file ("<base64 token>
<rank>" lines), a SentencePiece model, a `tokenizers` tokenizer.json, or a vocab.json +
merges.txt pair built into a `tokenizers` byte-level BPE as GPT-2 defines it (Qwen2: NFC and the
rule's split pattern first). Every problem is a `TokenizerError` naming the file; what is read
goes to its backend (`tokenizer_backends`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any

from slimllm.reference.errors import SlimllmError

from .families.common import TokenizerRule
from .tokenizer_backends import TokenizersBackend

__all__ = [
    "TokenizerError",
    "added_tokens",
    "ids_of",
    "is_tiktoken_text",
    "load_ranks",
    "load_sentencepiece",
    "load_tokenizer_json",
    "load_vocab_merges",
    "read_json",
    "token_text",
]


class TokenizerError(SlimllmError):
    """A tokenizer file is corrupt, unsupported or inconsistent with its configuration."""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in a file, {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read as JSON ({err})") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def token_text(value: Any) -> str | None:
    """A special-token entry of a tokenizer config: a string or an AddedToken-style dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def ids_of(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def added_tokens(
    tokenizer_config: dict[str, Any], special_map: dict[str, Any], directory: Path
) -> tuple[dict[str, int], set[str]]:
    """Tokens a HF tokenizer adds on top of its vocabulary file, and which of them are special.

    HF splits every added token out of typed text before the model tokenizer sees it.
    """
    added: dict[str, int] = {}
    special: set[str] = set()
    for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        text = token_text(entry)
        if text is not None and str(key).isdigit():
            added[text] = int(key)
            if isinstance(entry, dict) and entry.get("special", True):
                special.add(text)
    for text, token_id in read_json(directory / "added_tokens.json").items():
        if isinstance(token_id, int):
            added.setdefault(text, token_id)
    for source in (tokenizer_config, special_map):
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = token_text(source.get(key))
            if text:
                special.add(text)
        for entry in source.get("additional_special_tokens") or []:
            text = token_text(entry)
            if text:
                special.add(text)
    return added, special


def is_tiktoken_text(path: Path) -> bool:
    """Whether a file starts like a tiktoken rank file ("<base64 token> <rank>" lines)."""
    with path.open("rb") as f:
        first = f.readline(512).rstrip(b"\r\n")
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} \d+", first) is not None


def load_ranks(path: Path) -> dict[bytes, int]:
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


def load_sentencepiece(path: Path) -> Any:
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


def load_tokenizer_json(path: Path) -> TokenizersBackend:
    # On use: ~20 ms to import, and a checkpoint needs one library of three.
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as err:  # the Rust side raises a bare Exception for any parse problem
        raise TokenizerError(f"{path}: not a valid tokenizers file ({err})") from err
    return TokenizersBackend(path, tokenizer, "tokenizers-json")


def load_vocab_merges(
    vocab_path: Path,
    merges_path: Path,
    rule: TokenizerRule,
    added: dict[str, int],
    specials: set[str],
) -> TokenizersBackend:
    # On use: ~20 ms to import, and a checkpoint needs one library of three.
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = read_json(vocab_path)
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
        unknown = [t for t in (*pair, "".join(pair)) if t not in vocab]
        if unknown:  # tokenizers' BPE panics on these (a BaseException, past any except)
            raise TokenizerError(
                f"{merges_path}: line {number} merges {line!r} but {vocab_path.name} lacks "
                f"{unknown}"
            )
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
    return TokenizersBackend(vocab_path, tokenizer, "bpe-vocab-merges")
