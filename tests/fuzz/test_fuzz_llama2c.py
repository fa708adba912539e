"""Fuzzing llama2.c `.bin` files: a mutated header or length ends in a clean SlimllmError or the
original model, and the header cases issue 14 found are named regression tests.

The file is a tiny model written here (its size computed by hand from the format, not by the
loader's `layout`). A mutation changes one header field, flips one header byte, truncates the
file or appends bytes. One field at a time, because every field's share of the file size grows
strictly with it (and a flipped vocab sign adds an unshared classifier), so any single change
must disagree with the file size; two compensating changes could describe another valid model,
which the format cannot tell apart. Weight bytes are not mutated: the format has no checksum,
so changed weights are a valid, different model.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from fuzz.harness import outcome, same
from hypothesis import given
from hypothesis import strategies as st

from slimllm.conformance.profiles import fuzzing
from slimllm.weights.llama2c import read_llama2c

# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
HEADER = (8, 12, 2, 2, 1, 16, 4)
INT32 = st.integers(-(2**31), 2**31 - 1)


def floats_in(header) -> int:
    """The float32 count the format stores for a header (tied classifier when vocab > 0)."""
    e, f, layers, heads, kv_heads, v, seq = header
    d = e // heads
    per_layer = 2 * e + 2 * e * e + 2 * kv_heads * d * e + 3 * f * e
    return abs(v) * e * (1 if v > 0 else 2) + layers * per_layer + e + seq * d


def write(path, header, values: np.ndarray) -> None:
    path.write_bytes(struct.pack("<7i", *header) + values.astype("<f4").tobytes())


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The tiny model's path, bytes and loaded (config, params)."""
    path = tmp_path_factory.mktemp("fuzz_llama2c") / "original.bin"
    values = np.random.default_rng(0).standard_normal(floats_in(HEADER)).astype(np.float32)
    write(path, HEADER, values)
    return path, path.read_bytes(), read_llama2c(path)


def test_the_tiny_model_loads_with_its_header(original):
    _, raw, (cfg, params) = original
    assert (cfg.width, cfg.ffn_width, cfg.n_layers, cfg.n_heads) == HEADER[:4]
    assert (cfg.n_kv_heads, cfg.vocab, cfg.max_len, cfg.tied_head) == (*HEADER[4:], True)
    assert len(raw) == 28 + 4 * floats_in(HEADER)


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["field", "flip", "truncate", "append"]))
    if kind == "field":
        field = draw(st.integers(0, 6))
        near = HEADER[field] + draw(st.integers(-3, 3))
        value = draw(st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), near]), INT32))
        return raw[: 4 * field] + struct.pack("<i", value) + raw[4 * field + 4 :]
    if kind == "flip":
        at = draw(st.integers(0, 27))
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    return raw + draw(st.binary(min_size=1, max_size=64))


@fuzzing()
@given(data=st.data())
def test_fuzz_llama2c_header_and_length(original, data):
    path, raw, model = original
    target = path.with_name("mutated.bin")
    target.write_bytes(data.draw(mutated(raw)))
    message, loaded = outcome(read_llama2c, target)
    if loaded is not None:
        assert same(loaded, model)
    else:
        assert str(target) in message


# --- named regression tests ------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, why",
    [
        ((8, 12, 2, 2, 3, 16, 4), "n_kv_heads must divide n_heads"),  # was ModelConfig's ValueError
        ((6, 12, 2, 2, 1, 16, 4), "even head dimension"),  # head dim 3: RoPE pairs need even
        ((8, 12, 2, 3, 1, 16, 4), "n_heads must divide dim"),
        ((8, 12, 0, 2, 1, 16, 4), "a size is not > 0"),
        ((8, 12, 2, 2, 1, 0, 4), "a size is not > 0"),  # vocab 0
    ],
)
def test_implausible_headers_are_checkpoint_errors_naming_the_values(tmp_path, header, why):
    path = tmp_path / "m.bin"
    write(path, header, np.zeros(64, np.float32))
    message, _ = outcome(read_llama2c, path)
    assert "implausible llama2.c header (dim=" in message and why in message


def test_sizes_are_exact_where_int64_would_wrap(tmp_path):
    # 2**12 layers of [2**30, 2**30] weights: np.prod of the shape wraps int64, math.prod not
    header = (2**30, 2**30, 2**12, 2**10, 2**10, 16, 4)
    path = tmp_path / "m.bin"
    write(path, header, np.zeros(16, np.float32))
    message, _ = outcome(read_llama2c, path)
    assert f"needs {4 * floats_in(header)} bytes of weights, the file holds 64" in message


def test_a_truncated_or_padded_file_names_both_sizes(original, tmp_path):
    _, raw, _ = original
    path = tmp_path / "m.bin"
    needed = 4 * floats_in(HEADER)
    for data, why in ((raw[:-4], "file ends early"), (raw + bytes(8), "2 unexpected trailing")):
        path.write_bytes(data)
        message, _ = outcome(read_llama2c, path)
        assert why in message and f"needs {needed} bytes of weights" in message
