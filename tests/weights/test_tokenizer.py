"""Tokenizer loading, round trips, special ids and upstream encodings.

Uses the six real tokenizers in ../shared/tokenizers beside the checkout (third-party files, not
vendored: these tests skip without them) plus tiny synthetic ones for the shapes shared/ lacks
(GLM-4's tiktoken file, OPT's vocab.json + merges.txt).

The expected id lists are oracle values from upstream, made once by a scratch script:
llama2 with transformers 5.24 `LlamaTokenizerFast(tokenizer_file=tokenizer.json)`, qwen2 with
transformers 5.24 `AutoTokenizer` (Qwen2Tokenizer from vocab.json + merges.txt +
tokenizer_config.json). chatglm3, chatglm6b, baichuan2 and qwen1 need remote code, so their lists
follow the upstream tokenization_*.py logic by hand with the raw sentencepiece / tiktoken
libraries (chatglm3: [gMASK] sop + EncodeAsPieces, specials split as with
encode_special_tokens=True; chatglm6b: <n>/<|tab|>/<|blank_N|> rewriting, EncodeAsPieces, then
+ [gMASK] <sop>; baichuan2: encode(out_type=str) -> piece_to_id, add_bos_token false; qwen1: NFC,
tiktoken with PAT_STR and specials from 151643, allowed_special="all").
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES, TOKENIZERS, need
from slimllm.weights.tokenizer import Tokenizer, TokenizerError, load_tokenizer

NAMES = ["llama2", "qwen2", "chatglm3", "baichuan2", "qwen1", "chatglm6b"]

HELLO = "Hello world"
SPACES = " Hello  world "
CODE = "def f(x):\n    return x\t# tab\n"
CHINESE = "你好，世界！今天天气很好。"
EMOJI = "emoji 😀👍🏽 done"

# encode(text) with add_special=True, as upstream's tokenizer(text) gives it (see module doc).
EXPECTED: dict[str, dict[str, list[int]]] = {
    "llama2": {
        HELLO: [1, 15043, 3186],
        SPACES: [1, 29871, 15043, 29871, 3186, 29871],
        CODE: [1, 822, 285, 29898, 29916, 1125, 13, 1678, 736, 921, 12, 29937, 4434, 13],
        CHINESE: [1, 29871, 30919, 31076, 30214, 30793, 30967, 30584, 31482, 30408, 30408,
                  233, 179, 151, 232, 193, 139, 31076, 30267],
        EMOJI: [1, 953, 29877, 2397, 29871, 243, 162, 155, 131, 243, 162, 148, 144, 243, 162,
                146, 192, 2309],
        "Hello</s> world": [1, 15043, 2, 29871, 3186],
    },
    "qwen2": {
        HELLO: [9707, 1879],
        SPACES: [21927, 220, 1879, 220],
        CODE: [750, 282, 2075, 982, 262, 470, 856, 197, 2, 5651, 198],
        CHINESE: [108386, 3837, 99489, 6313, 100644, 104307, 101243, 1773],
        EMOJI: [37523, 90316, 144349, 145375, 2814],
        "<|im_start|>user\nhi<|im_end|>\n": [151644, 872, 198, 6023, 151645, 198],
    },
    "chatglm3": {
        HELLO: [64790, 64792, 13755, 993],
        SPACES: [64790, 64792, 265, 24218, 265, 8515, 30910],
        CODE: [64790, 64792, 884, 279, 30946, 30948, 1528, 13, 296, 3793, 1994, 12, 31010, 9151,
               13],
        CHINESE: [64790, 64792, 36474, 54591, 31123, 31661, 31404, 31869, 33071, 33058, 31155],
        EMOJI: [64790, 64792, 767, 30914, 6670, 30910, 31385, 64473, 243, 162, 146, 192, 1783],
        "<|system|>\nBe brief.<|user|>\nhi<|assistant|>": [
            64790, 64792, 64794, 30910, 13, 5617, 5155, 30930, 64795, 30910, 13, 5473, 64796
        ],
    },
    "baichuan2": {
        HELLO: [23160, 2063],
        SPACES: [52594, 92311, 2063, 92311],
        CODE: [5273, 1365, 92352, 92365, 3408, 5, 1411, 3509, 4838, 6, 92951, 15897, 5],
        CHINESE: [16829, 65, 2089, 67, 2441, 4054, 6423, 66],
        EMOJI: [1455, 51317, 92311, 98740, 100473, 100512, 3904],
    },
    "chatglm6b": {
        HELLO: [19316, 398, 130001, 130004],
        SPACES: [19316, 130009, 4664, 130001, 130004],
        CODE: [1616, 502, 20, 149, 125662, 4, 130011, 2091, 399, 130008, 61, 4162, 4, 130001,
               130004],
        CHINESE: [5, 74874, 6, 64097, 35, 64527, 65893, 65685, 63823, 130001, 130004],
        EMOJI: [33742, 5, 129891, 128788, 130328, 130247, 130231, 130277, 641, 130001, 130004],
    },
    # Qwen (v1) and Qwen2 share one byte-level vocabulary: the same ids as qwen2 above.
    "qwen1": {
        HELLO: [9707, 1879],
        SPACES: [21927, 220, 1879, 220],
        CODE: [750, 282, 2075, 982, 262, 470, 856, 197, 2, 5651, 198],
        CHINESE: [108386, 3837, 99489, 6313, 100644, 104307, 101243, 1773],
        EMOJI: [37523, 90316, 144349, 145375, 2814],
        "<|im_start|>user\nhi<|im_end|>\n": [151644, 872, 198, 6023, 151645, 198],
    },
}  # fmt: skip

ROUND_TRIP = [HELLO, SPACES, CODE, CHINESE, EMOJI, "a\n\n\nb", "  two leading", "x" * 3 + " " * 90]


@pytest.fixture(scope="module")
def loaded():
    """Each real tokenizer, loaded on first use and kept for the module."""
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            tok = load_tokenizer(need(TOKENIZERS / name))
            assert tok is not None
            cache[name] = tok
        return cache[name]

    return get


@pytest.mark.parametrize(
    ("name", "kind", "family", "vocab_size"),
    [
        ("llama2", "tokenizers-json", "llama", 32000),
        ("qwen2", "bpe-vocab-merges", "qwen2", 151646),
        ("chatglm3", "sentencepiece", "chatglm2", 64789 + 9),
        ("baichuan2", "sentencepiece", "baichuan", 125696),
        ("qwen1", "tiktoken", "qwen", 151643 + 208),
        ("chatglm6b", "sentencepiece", "chatglm", 130344),
    ],
)
def test_loads_with_kind_and_family(loaded, name, kind, family, vocab_size):
    tok = loaded(name)
    assert (tok.kind, tok.family, tok.vocab_size) == (kind, family, vocab_size)


@pytest.mark.parametrize(
    ("name", "text"), [(name, text) for name, cases in EXPECTED.items() for text in cases]
)
def test_encodes_like_upstream(loaded, name, text):
    assert loaded(name).encode(text) == EXPECTED[name][text]


@pytest.mark.parametrize("name", NAMES)
def test_round_trips(loaded, name):
    tok = loaded(name)
    texts = ROUND_TRIP
    if name == "chatglm6b":
        # ice_text.model normalises with nmt_nfkc and remove_extra_whitespaces: upstream drops
        # leading/trailing single spaces and turns full-width punctuation into ASCII.
        texts = [HELLO, CODE, EMOJI, "a\n\n\nb", "  two leading", "x" * 3 + " " * 90]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special=False)) == text
        assert tok.decode(tok.encode(text)) == text  # the prompt specials are dropped again


def test_chatglm6b_normalises_like_upstream(loaded):
    tok = loaded("chatglm6b")
    assert tok.decode(tok.encode(SPACES)) == "Hello  world"
    assert tok.decode(tok.encode(CHINESE)) == "你好,世界!今天天气很好。"


def test_prompt_special_ids(loaded):
    llama = loaded("llama2")
    assert (llama.bos_id, llama.eos_ids, llama.prefix_ids, llama.suffix_ids) == (1, (2,), (1,), ())
    assert llama.encode("Hi")[0] == 1 and llama.encode("Hi", add_special=False)[0] != 1

    glm3 = loaded("chatglm3")
    assert glm3.prefix_ids == (64790, 64792) and glm3.suffix_ids == ()
    assert glm3.encode("Hi")[:2] == [64790, 64792]
    # generation_config.json of chatglm3-6b: eos_token_id [2, 64795, 64797]
    assert glm3.eos_ids == (2, 64795, 64797)
    assert glm3.bos_id is None
    assert {k: glm3.special[k] for k in ("[gMASK]", "sop", "<|user|>", "<|observation|>")} == {
        "[gMASK]": 64790,
        "sop": 64792,
        "<|user|>": 64795,
        "<|observation|>": 64797,
    }

    glm6 = loaded("chatglm6b")
    assert glm6.encode("Hi")[-2:] == [130001, 130004] and glm6.prefix_ids == ()
    assert (glm6.bos_id, glm6.eos_ids) == (130004, (130005,))
    assert glm6.special["[gMASK]"] == 130001

    baichuan = loaded("baichuan2")  # its tokenizer_config sets add_bos_token false
    assert (baichuan.prefix_ids, baichuan.suffix_ids, baichuan.bos_id, baichuan.eos_ids) == (
        (),
        (),
        1,
        (2,),
    )

    qwen2 = loaded("qwen2")
    assert qwen2.prefix_ids == () and qwen2.bos_id is None
    assert qwen2.special == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    assert qwen2.eos_ids == (151645, 151643)  # generation_config.json order

    qwen1 = loaded("qwen1")
    assert qwen1.prefix_ids == () and qwen1.bos_id is None
    assert qwen1.special["<|endoftext|>"] == 151643 and qwen1.special["<|im_start|>"] == 151644
    assert qwen1.special["<|im_end|>"] == 151645 and qwen1.special["<|extra_204|>"] == 151850
    assert qwen1.eos_ids == (151643, 151645, 151644)


@pytest.mark.parametrize(
    ("name", "text", "ids"),
    [
        ("qwen2", "<|im_end|>", [151645]),
        ("qwen1", "a<|endoftext|>b", [64, 151643, 65]),
        ("qwen1", "<|extra_3|>", [151649]),
        ("chatglm3", "<|observation|>", [64797]),
        ("chatglm6b", "[gMASK]", [130001]),
        ("llama2", "<s>", [1]),
        ("baichuan2", "</s>", [2]),
    ],
)
def test_typed_specials_encode_to_their_ids(loaded, name, text, ids):
    assert loaded(name).encode(text, add_special=False) == ids


def test_bare_sop_is_text_for_chatglm3(loaded):
    # "sop" and "eop" are ChatGLM3 specials but also ordinary words: only the bracketed specials
    # are recognised in typed text.
    tok = loaded("chatglm3")
    assert tok.special["sop"] not in tok.encode("sop", add_special=False)


@pytest.mark.parametrize(
    ("name", "ids", "skipped", "kept"),
    [
        ("qwen2", [151644, 872, 198, 6023, 151645], "user\nhi", "<|im_start|>user\nhi<|im_end|>"),
        ("qwen1", [151644, 872, 198, 6023, 151645], "user\nhi", "<|im_start|>user\nhi<|im_end|>"),
        # transformers' LlamaTokenizerFast.decode gives the same two strings
        ("llama2", [1, 15043, 2], "Hello", "<s> Hello</s>"),
        # chatglm3's SPTokenizer.decode: special text between separately decoded runs
        ("chatglm3", [64790, 64792, 13755, 64795], "Hello", "[gMASK]sopHello<|user|>"),
    ],
)
def test_decode_skips_or_shows_specials(loaded, name, ids, skipped, kept):
    tok = loaded(name)
    assert tok.decode(ids) == skipped
    assert tok.decode(ids, skip_special=False) == kept


@pytest.mark.parametrize("name", NAMES)
def test_ids_past_the_vocabulary_decode_to_nothing(loaded, name):
    # Checkpoints pad the embedding beyond the tokenizer (e.g. ChatGLM3 65024 rows).
    tok = loaded(name)
    ids = tok.encode("ok", add_special=False)
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 100, -1]) == "ok"


STREAM_TEXT = " Hi  there!\n\n你好，世界😀👍🏽\tend  of   story. Ünïcödé 🇨🇳 "


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("skip_special", [True, False])
def test_streaming_concatenates_to_full_decode(loaded, name, skip_special):
    tok = loaded(name)
    ids = tok.encode(STREAM_TEXT)
    shown = ""
    for k in range(1, len(ids) + 1):
        new = tok.decode_stream(ids[:k], shown, skip_special=skip_special)
        assert "\ufffd" not in new  # half a character is never shown
        shown += new
    shown += tok.decode_stream(ids, shown, skip_special=skip_special, final=True)
    assert shown == tok.decode(ids, skip_special=skip_special)


def test_streaming_holds_back_split_utf8(loaded):
    tok = loaded("llama2")
    ids = tok.encode("😀", add_special=False)
    assert [tok.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert [tok.decode_stream(ids[:k], "") for k in range(1, 5)] == ["", "", "", ""]
    assert tok.decode_stream(ids, "") == "😀"
    # A generation that stops mid-character flushes replacement characters (one per byte, as
    # tokenizers' ByteFallback decoder writes them) at the end.
    assert tok.decode_stream(ids[:3], "", final=True) == "\ufffd\ufffd"


def test_streaming_keeps_sentencepiece_spaces(loaded):
    tok = loaded("baichuan2")
    ids = tok.encode("a b  c", add_special=False)
    pieces = [tok.decode_stream(ids[: k + 1], tok.decode(ids[:k])) for k in range(len(ids))]
    assert "".join(pieces) == "a b  c"


def test_piece_lookups(loaded):
    llama = loaded("llama2")
    assert llama.id_to_piece(15043) == "▁Hello" and llama.token_to_id("▁Hello") == 15043
    assert llama.token_to_id("no such piece") is None and llama.id_to_piece(10**6) is None
    glm3 = loaded("chatglm3")
    assert glm3.token_to_id("<|user|>") == 64795 and glm3.id_to_piece(64796) == "<|assistant|>"
    assert glm3.token_to_id("no such piece") is None
    qwen1, qwen2 = loaded("qwen1"), loaded("qwen2")
    # tiktoken pieces are shown in the byte-level form that Qwen2's vocab.json uses
    assert qwen1.id_to_piece(1879) == qwen2.id_to_piece(1879) == "Ġworld"
    assert qwen1.token_to_id("Ġworld") == qwen1.token_to_id(" world") == 1879
    assert qwen1.token_to_id("<|im_end|>") == qwen2.token_to_id("<|im_end|>") == 151645


def _copy(name: str, files: list[str], dest: Path) -> Path:
    source = need(TOKENIZERS / name)
    for file in files:
        shutil.copy(source / file, dest / file)
    return dest


def test_sentencepiece_llama_matches_tokenizer_json(loaded, tmp_path):
    files = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    sp = load_tokenizer(_copy("llama2", files, tmp_path))
    assert sp is not None and sp.kind == "sentencepiece" and sp.family == "llama"
    fast = loaded("llama2")
    for text in [*EXPECTED["llama2"], STREAM_TEXT]:
        assert sp.encode(text) == fast.encode(text)
        assert sp.decode(sp.encode(text)) == fast.decode(fast.encode(text))


def test_qwen_tiktoken_found_by_its_usual_name_without_config(tmp_path):
    source = need(TOKENIZERS / "qwen1" / "tokenizer.model")
    (tmp_path / "qwen.tiktoken").symlink_to(source)
    tok = load_tokenizer(tmp_path)
    # 151643 base ranks is Qwen's size, which names the family when no config does
    assert tok is not None and (tok.kind, tok.family) == ("tiktoken", "qwen")
    assert tok.encode(HELLO) == EXPECTED["qwen1"][HELLO]


def test_model_config_decides_the_family(loaded, tmp_path):
    _copy("chatglm3", ["tokenizer.model"], tmp_path)  # no tokenizer_config.json
    assert load_tokenizer(tmp_path).family == "llama"  # a bare SentencePiece model
    tok = load_tokenizer(tmp_path, config={"model_type": "chatglm"})
    assert tok.family == "chatglm2" and tok.encode("Hi") == loaded("chatglm3").encode("Hi")


def _write_ranks(path: Path, tokens: list[bytes]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


# Single bytes, then merges that build "hello" step by step (tiktoken needs each one reachable).
TINY_RANKS = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"llo", b"hello"]


def test_glm4_tiktoken_specials_follow_the_ranks(tmp_path):
    _write_ranks(tmp_path / "tokenizer.model", TINY_RANKS)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "ChatGLM4Tokenizer"}')
    tok = load_tokenizer(tmp_path)
    assert tok is not None and (tok.kind, tok.family) == ("tiktoken", "glm")
    base = len(TINY_RANKS)  # GLM-4 numbers its 14 specials from len(ranks)
    assert tok.vocab_size == base + 14
    assert tok.prefix_ids == (base + 2, base + 4)  # [gMASK] <sop>
    assert tok.eos_ids == (base, base + 7, base + 9)  # <|endoftext|> <|user|> <|observation|>
    assert tok.encode("hello<|user|>hello") == [base + 2, base + 4, 259, base + 7, 259]
    assert (
        tok.decode(tok.encode("hello<|user|>"), skip_special=False) == "[gMASK]<sop>hello<|user|>"
    )


def _gpt2_files(directory: Path) -> dict[str, int]:
    """A tiny OPT-style vocab.json + merges.txt: OPT's four specials, 256 byte chars, 9 merges."""
    chars = {}
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = iter(range(0x100, 0x200))
    for b in range(256):
        chars[b] = chr(b) if b in keep else chr(next(moved))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[chars[b]] = len(vocab)
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    return vocab


def test_opt_prefixes_eos_as_bos(tmp_path):
    vocab = _gpt2_files(tmp_path)
    tok = load_tokenizer(tmp_path, config={"model_type": "opt", "eos_token_id": 2})
    assert tok is not None and (tok.kind, tok.family) == ("bpe-vocab-merges", "opt")
    assert (tok.bos_id, tok.eos_ids, tok.prefix_ids) == (2, (2,), (2,))
    assert tok.encode("hello world") == [2, vocab["hello"], vocab["Ġworld"]]
    assert tok.encode("hello</s>") == [2, vocab["hello"], 2]
    assert tok.decode(tok.encode("hello world! ü")) == "hello world! ü"
    # plain GPT-2 adds nothing in front
    assert load_tokenizer(tmp_path, config={"model_type": "gpt2"}).prefix_ids == ()


def test_empty_directory_has_no_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert load_tokenizer(tmp_path) is None


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("tokenizer.model", b"\x00\x01 definitely not a model", "tokenizer.model"),
        ("tokenizer.model", b"", "tokenizer.model: empty"),
        ("ice_text.model", b"garbage", "ice_text.model"),
        ("tokenizer.json", b'{"version": "1.0", "model": 7}', "tokenizer.json"),
        ("tokenizer.json", b"{not json", "tokenizer.json"),
        ("qwen.tiktoken", b"IQ== 0\nnot-base64!! 1\n", "qwen.tiktoken: bad tiktoken rank line 2"),
    ],
)
def test_corrupt_files_name_the_file(tmp_path, file, content, message):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "FooTokenizer"}')
    (tmp_path / file).write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)


def test_tiktoken_file_of_unknown_family_is_an_error(tmp_path):
    _write_ranks(tmp_path / "tokenizer.model", TINY_RANKS)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "FooTokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.model: tiktoken rank file"):
        load_tokenizer(tmp_path)


def test_corrupt_config_names_the_file(tmp_path):
    _write_ranks(tmp_path / "qwen.tiktoken", TINY_RANKS)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path)


# Model and tokenizer agree (issue 14): a tokenizer whose ids the model has no rows for was
# accepted at load, and a prompt failed later ("token id 9038 is outside the vocabulary").


def _llama_checkpoint(directory: Path) -> Path:
    """A copy of the llama fixture (vocabulary of 256 ids), no tokenizer yet."""
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "llama" / name, directory / name)
    return directory


def test_tokenizer_with_more_ids_than_the_model_is_refused_at_load(tmp_path):
    from slimllm.weights import load_checkpoint
    from slimllm.weights.io import CheckpointError

    _gpt2_files(_llama_checkpoint(tmp_path))  # 4 specials + 256 bytes + 9 merges = 269 ids
    with pytest.raises(
        CheckpointError,
        match=r"vocab.json: the tokenizer has 269 ids \(largest 268\) but the model's "
        r"vocabulary has 256 \(config.json vocab_size\)",
    ):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, tokenizer=False).cfg.vocab == 256  # weights alone load


def test_model_with_padding_rows_past_the_tokenizer_loads(tmp_path):
    """A model may have more embedding rows than the tokenizer has ids (padding)."""
    from slimllm.weights import load_checkpoint

    d = _llama_checkpoint(tmp_path)
    vocab = {c: i for i, c in enumerate([*"abcdefg", "ab"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\na b\n")
    ck = load_checkpoint(d)
    assert ck.tokenizer is not None and (ck.tokenizer.vocab_size, ck.cfg.vocab) == (8, 256)


def test_tokenizer_json_vocab_size_counts_ids_past_a_gap(tmp_path):
    """An added token numbered past a gap: `tokenizers` counts 5 entries, the tokenizer produces
    id 1000, so vocab_size is 1001 (and the model of 256 rows refuses it)."""
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    from slimllm.weights import load_checkpoint
    from slimllm.weights.io import CheckpointError

    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<x>": 1000}, merges=[("a", "b")]))
    hf.add_special_tokens([AddedToken("<x>", special=True)])
    d = _llama_checkpoint(tmp_path)
    hf.save(str(d / "tokenizer.json"))
    tok = load_tokenizer(d)
    assert tok is not None and tok.vocab_size == 1001
    assert tok.encode("ab<x>") == [2, 1000]
    assert tok.decode([1000], skip_special=False) == "<x>"  # was dropped as unknown
    with pytest.raises(CheckpointError, match=r"1001 ids \(largest 1000\) .* has 256"):
        load_checkpoint(d)


def test_merge_of_tokens_the_vocabulary_lacks_is_an_error(tmp_path):
    """tokenizers' BPE panicked (PyO3 PanicException, not an Exception) on such a merge."""
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match=r"merges.txt: line 2 merges 'a b' but .* \['ab'\]"):
        load_tokenizer(tmp_path)
