"""Fuzzing the safetensors header and the shard index (issue 14): every mutation of a valid
checkpoint must end in a clean SlimllmError or in a model identical to the original.

The checkpoint is the llama fixture, whole (one model.safetensors) or split into two shards by
a `model.safetensors.index.json`. Mutations are drawn at two levels: the header's JSON (a value
swapped for one of another type, a key deleted or given twice, sizes made huge or negative, an
entry spliced from another tensor) and its bytes (truncated, flipped, spliced, the length
prefix rewritten). The tensor data is never touched: flipping a weight's bytes gives another
valid model, which a loader cannot tell from the original. `outcome` and `same` are the fuzz
harness's (tests/fuzz/harness.py); `fuzzing()` draws a few dozen cases per target under `ci`
and thousands under the `fuzz` profile.
"""

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from fuzz.harness import outcome, same
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES
from slimllm.conformance.profiles import fuzzing
from slimllm.weights import load_checkpoint

SOURCE = FIXTURES / "llama"
RAW = (SOURCE / "model.safetensors").read_bytes()
N = int.from_bytes(RAW[:8], "little")
HEADER = json.loads(RAW[8 : 8 + N])
DATA = RAW[8 + N :]
NAMES = sorted(n for n in HEADER if n != "__metadata__")
KEYS = ("dtype", "shape", "data_offsets")

# Values of every JSON type, with the sizes that broke readers: huge, negative, past int64.
SIZES = st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63)])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**20), 2**20),
    SIZES,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["F32", "I32", "BF16", "F16", "U8", "F8_E4M3", "C64"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@functools.cache
def original():
    return load_checkpoint(SOURCE, tokenizer=False)


@functools.cache
def checkpoint_dir(name: str) -> Path:
    """A directory per target holding the fixture's configs; each case writes its weights."""
    directory = Path(tempfile.mkdtemp(prefix=f"slimllm-fuzz-{name}-"))
    atexit.register(shutil.rmtree, directory, True)  # whatever the case's outcome
    for file in ("config.json", "generation_config.json"):
        shutil.copy(SOURCE / file, directory / file)
    return directory


def assert_clean_or_identical(directory: Path) -> str | None:
    """The case's property: a one-line SlimllmError, or params and config equal the original."""
    message, loaded = outcome(load_checkpoint, directory, tokenizer=False)
    if loaded is not None:
        assert loaded.cfg == original().cfg
        assert same(loaded.params, original().params), "a mutated checkpoint loaded different"
    return message


def dumps(pairs: list[tuple[str, object]]) -> str:
    """A JSON object from (key, value) pairs, keeping keys given twice."""
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"


@st.composite
def json_mutation(draw, pairs: list[tuple[str, object]]):
    """One JSON-level change to a header given as (name, entry) pairs."""
    pairs = [(k, dict(v) if isinstance(v, dict) else v) for k, v in pairs]
    i = draw(st.integers(0, len(pairs) - 1))
    name, entry = pairs[i]
    if not isinstance(entry, dict):  # an earlier mutation made it another type
        entry = {}
        pairs[i] = (name, entry)
    kind = draw(
        st.sampled_from(["swap", "delete_key", "delete", "duplicate", "size", "splice", "rename"])
    )
    if kind == "swap":  # a value of another type (or the whole entry)
        key = draw(st.sampled_from([*KEYS, None]))
        if key is None:
            pairs[i] = (name, draw(VALUES))
        else:
            entry[key] = draw(VALUES)
    elif kind == "delete_key":
        entry.pop(draw(st.sampled_from(KEYS)), None)
    elif kind == "delete":
        del pairs[i]
    elif kind == "duplicate":  # the name again, its entry possibly another tensor's
        other = draw(st.sampled_from(pairs))[1]
        pairs.insert(draw(st.integers(0, len(pairs))), (name, json.loads(json.dumps(other))))
    elif kind == "size":  # one size or offset made huge, negative or off by a little
        key = draw(st.sampled_from(["shape", "data_offsets"]))
        values = list(entry[key]) if isinstance(entry.get(key), list) else [0]
        if values:
            j = draw(st.integers(0, len(values) - 1))
            base = values[j] if isinstance(values[j], int) else 0
            values[j] = draw(SIZES | st.integers(-2, 2).map(lambda d: base + d))
        entry[key] = values
    elif kind == "splice":  # one key's value taken from another tensor
        key = draw(st.sampled_from(KEYS))
        other = draw(st.sampled_from(pairs))[1]
        entry[key] = other.get(key) if isinstance(other, dict) else other
    else:  # renamed: a name another tensor has, or a new one
        pairs[i] = (draw(st.sampled_from(NAMES) | st.text(max_size=12)), entry)
    return pairs


HEADER_PAIRS = list(HEADER.items())


@given(data=st.data())
@fuzzing()
def test_header_json_mutations_fail_cleanly_or_change_nothing(data):
    pairs = HEADER_PAIRS
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        pairs = data.draw(json_mutation(pairs))
    if data.draw(st.booleans(), label="metadata"):  # replaced, else every case is a duplicate
        meta = data.draw(VALUES)
        pairs = [(k, meta if k == "__metadata__" else v) for k, v in pairs]
    header = dumps(pairs).encode()
    directory = checkpoint_dir("header")
    (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + DATA)
    assert_clean_or_identical(directory)


@given(data=st.data())
@fuzzing()
def test_header_byte_mutations_fail_cleanly_or_change_nothing(data):
    """Bytes of the length prefix and the header flipped, truncated or spliced (never the data:
    another weight is another valid model)."""
    head = bytearray(RAW[: 8 + N])
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "length"]), label="kind")
    tail = DATA
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(head) - 1))
            head[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":  # the file cut anywhere
        cut = data.draw(st.integers(0, len(RAW) - 1))
        head, tail = bytearray(RAW[:cut]), b""
    elif kind == "splice":  # a piece of the header copied over or into another place
        a = data.draw(st.integers(8, len(head) - 1))
        b = data.draw(st.integers(a, min(len(head), a + 64)))
        at = data.draw(st.integers(8, len(head)))
        piece = bytes(head[a:b])
        if data.draw(st.booleans(), label="insert"):
            head[at:at] = piece
        else:
            head[at : at + len(piece)] = piece
        if data.draw(st.booleans(), label="fix length"):
            head[:8] = (len(head) - 8).to_bytes(8, "little")
    else:  # the length prefix rewritten
        head[:8] = (data.draw(SIZES | st.integers(0, len(RAW))) % 2**64).to_bytes(8, "little")
    directory = checkpoint_dir("bytes")
    (directory / "model.safetensors").write_bytes(bytes(head) + tail)
    assert_clean_or_identical(directory)


# Shard indexes: the fixture split into a.safetensors and b.safetensors once.


@functools.cache
def sharded() -> tuple[Path, dict[str, str]]:
    directory = checkpoint_dir("shards")  # the index is each case's
    tensors = load_file(SOURCE / "model.safetensors")
    for shard, names in (("a.safetensors", NAMES[::2]), ("b.safetensors", NAMES[1::2])):
        save_file({n: tensors[n] for n in names}, str(directory / shard))
    weight_map = {n: "ab"[i % 2] + ".safetensors" for i, n in enumerate(NAMES)}
    return directory, weight_map


FILES = st.sampled_from(
    [
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
        "/etc/passwd",
        "../a.safetensors",
        "./a.safetensors",
        "a.safetensors/",
        "config.json",
        "",
        ".",
    ]
)


@given(data=st.data())
@fuzzing()
def test_shard_index_mutations_fail_cleanly_or_change_nothing(data):
    directory, weight_map = sharded()
    pairs = list(weight_map.items())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(["file", "value", "delete", "duplicate", "add"]))
        i = data.draw(st.integers(0, len(pairs) - 1))
        if kind == "file":  # another file name: the other shard, a missing one, outside paths
            pairs[i] = (pairs[i][0], data.draw(FILES))
        elif kind == "value":
            pairs[i] = (pairs[i][0], data.draw(VALUES))
        elif kind == "delete" and len(pairs) > 1:
            del pairs[i]
        elif kind == "duplicate":
            pairs.insert(i, (pairs[i][0], data.draw(FILES)))
        else:
            pairs.insert(i, (data.draw(st.text(max_size=12)), data.draw(FILES)))
    index = "{" + f'"metadata": {json.dumps(data.draw(VALUES))}, "weight_map": {dumps(pairs)}' + "}"
    top = data.draw(st.sampled_from(["object", "bytes", "other"]), label="top")
    text = index.encode()
    if top == "bytes":  # flipped or truncated
        at = data.draw(st.integers(0, len(text) - 1))
        if data.draw(st.booleans(), label="truncate"):
            text = text[:at]
        else:
            text = text[:at] + bytes([text[at] ^ data.draw(st.integers(1, 255))]) + text[at + 1 :]
    elif top == "other":  # the whole index, or its weight map, of another type
        other = json.dumps(data.draw(VALUES))
        text = (other if data.draw(st.booleans()) else '{"weight_map": ' + other + "}").encode()
    (directory / "model.safetensors.index.json").write_bytes(text)
    assert_clean_or_identical(directory)
