"""PyTorch .bin checkpoints read without torch: round trips, hand-made pickles, refusals.

Checkpoints are made by `write_torch_bin` or, to test the reader independently of the writer,
from pickles assembled here opcode by opcode (protocol-0 style text opcodes, unlike the
writer's binary ones). torch is never imported here; reader and writer were checked by hand
against torch 2.13 when written (torch.save files read, writer files read by torch.load).
"""

from __future__ import annotations

import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import FIXTURES
from slimllm.weights import torch_bin_write
from slimllm.weights.torch_bin import (
    TorchBinError,
    UnsafePickleError,
    list_torch_bin,
    load_torch_bin,
)
from slimllm.weights.torch_bin_write import write_torch_bin

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy-format magic number

WRITABLE = [
    np.float32,
    np.float16,
    np.float64,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.bool_,
]


# --- hand-made pickles ------------------------------------------------------------------------


def p_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def p_int(value: int) -> bytes:
    return pickle.INT + b"%d\n" % value


def p_str(value: str) -> bytes:
    return pickle.UNICODE + value.encode("raw_unicode_escape") + b"\n"


def p_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def p_dict(entries: dict[str, bytes]) -> bytes:
    items = b"".join(p_str(key) + value for key, value in entries.items())
    return pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS


NEW_ORDERED_DICT = p_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE


def p_storage(type_name: str, key: str, numel: int) -> bytes:
    """A persistent reference to storage `key`, as torch.save writes it."""
    pid = p_tuple(
        p_str("storage"), p_global("torch", type_name), p_str(key), p_str("cpu"), p_int(numel)
    )
    return pid + pickle.BINPERSID


def p_tensor(storage: bytes, offset: int, shape, stride, *extra: bytes) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())."""
    args = p_tuple(
        storage,
        p_int(offset),
        p_tuple(*map(p_int, shape)),
        p_tuple(*map(p_int, stride)),
        pickle.NEWFALSE,
        NEW_ORDERED_DICT,
        *extra,
    )
    return p_global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def p_top(body: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def make_zip(path: Path, pkl: bytes, storages: dict[str, bytes], byteorder=b"little") -> Path:
    """A torch.save-style archive under a folder name other than the writer's."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("my_model/data.pkl", pkl)
        if byteorder is not None:
            archive.writestr("my_model/byteorder", byteorder)
        for key, data in storages.items():
            archive.writestr(f"my_model/data/{key}", data)
        archive.writestr("my_model/version", "3\n")
    return path


def make_legacy(path: Path, pkl: bytes, storages: dict[str, np.ndarray], little=True) -> Path:
    """torch.save's pre-1.6 stream: magic, protocol, system info, object, keys, storages."""
    order = "<" if little else ">"
    sys_info = {"protocol_version": 1001, "little_endian": little, "type_sizes": {"int": 4}}
    parts = [pickle.dumps(v, protocol=2) for v in (LEGACY_MAGIC, 1001, sys_info)]
    parts += [pkl, pickle.dumps(sorted(storages), protocol=2)]
    for key in sorted(storages):
        data = storages[key]
        raw = data.astype(data.dtype.newbyteorder(order)).tobytes()
        parts.append(struct.pack(order + "q", data.size) + raw)
    path.write_bytes(b"".join(parts))
    return path


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """An array of the same dtype, shape and bytes (so NaN payloads and -0.0 count too)."""
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", WRITABLE, ids=lambda d: np.dtype(d).name)
def test_round_trip_each_dtype_and_shape(tmp_path, dtype):
    rng = np.random.default_rng(0)
    shapes = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (2, 3, 4), (1, 1, 1, 2)]
    tensors = {}
    for i, shape in enumerate(shapes):
        values = rng.standard_normal(shape) * 100
        tensors[f"t{i}"] = (values > 0) if dtype is np.bool_ else values.astype(dtype)
    path = tmp_path / "m.bin"
    write_torch_bin(path, tensors)
    loaded = load_torch_bin(path, keep_dtype=True)
    assert list(loaded) == list(tensors)
    for name, want in tensors.items():
        assert_same(loaded[name], want)
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable
    stored = "bool" if dtype is np.bool_ else np.dtype(dtype).name
    assert list_torch_bin(path) == {name: (stored, a.shape) for name, a in tensors.items()}


@given(
    tensors=st.dictionaries(
        st.text(min_size=1, max_size=12),
        hnp.arrays(
            st.sampled_from(WRITABLE),
            hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        ),
        max_size=5,
    )
)
def test_round_trip_property(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("prop") / "m.bin"
    write_torch_bin(path, tensors)
    loaded = load_torch_bin(path, keep_dtype=True)
    assert list(loaded) == list(tensors)
    for name, want in tensors.items():
        assert_same(loaded[name], want)


def test_writer_accepts_non_contiguous_and_big_endian_input(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {
        "transposed": base.T,
        "sliced": base[1:3, ::2],
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f4"),
        "from_list": [[1, 2], [3, 4]],
    }
    write_torch_bin(tmp_path / "m.bin", tensors)
    loaded = load_torch_bin(tmp_path / "m.bin")
    for name, want in tensors.items():
        want = np.asarray(want)
        assert_same(loaded[name], want.astype(want.dtype.newbyteorder("=")))


def test_half_precision_widens_to_float32_exactly(tmp_path):
    halves = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6e-8, np.inf, -np.inf, np.nan], np.float16)
    write_torch_bin(tmp_path / "m.bin", {"h": halves})
    widened = load_torch_bin(tmp_path / "m.bin")["h"]
    assert widened.dtype == np.float32
    assert_same(widened, halves.astype(np.float32))
    assert_same(load_torch_bin(tmp_path / "m.bin", keep_dtype=True)["h"], halves)
    assert list_torch_bin(tmp_path / "m.bin") == {"h": ("float16", (9,))}


def test_bfloat16_storage_reads_as_the_top_half_of_float32(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x3FC1], "<u2")
    want = np.array(
        [1.0, -2.0, 0.0, -0.0, np.inf, -np.inf, 2.0**-133, 1.5078125], np.float32
    ).reshape(2, 4)
    pkl = p_top(p_dict({"w": p_tensor(p_storage("BFloat16Storage", "0", 8), 0, (2, 4), (4, 1))}))
    path = make_zip(tmp_path / "m.bin", pkl, {"0": bits.tobytes()})
    for keep_dtype in (False, True):  # NumPy has no bfloat16: always float32
        assert_same(load_torch_bin(path, keep_dtype=keep_dtype)["w"], want)
    nan = make_zip(
        tmp_path / "nan.bin",
        p_top(p_dict({"w": p_tensor(p_storage("BFloat16Storage", "0", 1), 0, (), ())})),
        {"0": np.array([0x7FC0], "<u2").tobytes()},
    )
    assert np.isnan(load_torch_bin(nan)["w"])
    assert list_torch_bin(path) == {"w": ("bfloat16", (2, 4))}


def test_bf16_writer_rounds_to_nearest_even(tmp_path):
    special = np.array(
        [
            1.0,
            1 + 2.0**-8,  # halfway between 1 and the next bf16: ties to even (1.0)
            1 + 3 * 2.0**-8,  # halfway again: ties to even (1 + 2**-6)
            1 + 2.0**-8 + 2.0**-20,  # just above halfway: rounds up
            -0.0,
            np.inf,
            np.finfo(np.float32).max,  # beyond the largest bf16: rounds to inf
            np.nan,
        ],
        np.float32,
    )
    rounded = np.array(
        [1.0, 1.0, 1 + 2.0**-6, 1 + 2.0**-7, -0.0, np.inf, np.inf, np.nan], np.float32
    )
    rng = np.random.default_rng(1)
    random = (rng.standard_normal(4000) * 10.0 ** rng.integers(-30, 30, 4000)).astype(np.float32)
    write_torch_bin(
        tmp_path / "m.bin",
        {"special": special, "random": random, "ints": np.arange(3)},
        bf16_from_float32=True,
    )
    assert list_torch_bin(tmp_path / "m.bin") == {
        "special": ("bfloat16", (8,)),
        "random": ("bfloat16", (4000,)),
        "ints": ("int64", (3,)),
    }
    loaded = load_torch_bin(tmp_path / "m.bin")
    assert_same(loaded["special"][:-1], rounded[:-1])
    assert np.isnan(loaded["special"][-1])
    assert_same(loaded["ints"], np.arange(3))
    # each value is a bf16 (low 16 bits clear) within half a bf16 step of the input
    got = loaded["random"]
    assert not (got.view(np.uint32) & 0xFFFF).any()
    step = np.spacing(np.abs(random)).astype(np.float64) * 2.0**16
    assert (np.abs(got.astype(np.float64) - random) <= step / 2).all()


# --- hand-made pickles: views, sharing, parameters, layouts -------------------------------------


def test_strided_views_of_one_shared_storage(tmp_path):
    flat = np.arange(24, dtype=np.float32) * 1.5
    storage = p_storage("FloatStorage", "0", 24)
    pkl = p_top(
        p_dict(
            {
                "transposed": p_tensor(storage, 0, (3, 4), (1, 3)),
                "window": p_tensor(storage, 7, (2, 3), (6, 1)),
                "expanded": p_tensor(storage, 2, (3, 2), (0, 1)),
                "scalar": p_tensor(storage, 23, (), ()),
                "all": p_tensor(storage, 0, (4, 6), (6, 1)),
            }
        )
    )
    loaded = load_torch_bin(make_zip(tmp_path / "m.bin", pkl, {"0": flat.tobytes()}))
    want = {
        "transposed": flat[:12].reshape(4, 3).T,
        "window": flat.reshape(4, 6)[1:3, 1:4],
        "expanded": np.broadcast_to(flat[2:4], (3, 2)),
        "scalar": np.array(flat[23]),
        "all": flat.reshape(4, 6),
    }
    for name, array in want.items():
        assert_same(loaded[name], np.asarray(array))
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable
    loaded["all"][:] = -1  # tensors that shared a storage must not alias each other
    assert_same(loaded["window"], flat.reshape(4, 6)[1:3, 1:4])


def test_parameters_and_the_neg_bit(tmp_path):
    values = np.array([1.0, -2.0, 3.0], np.float32)
    tensor = p_tensor(p_storage("FloatStorage", "0", 3), 0, (3,), (1,))
    hooks = NEW_ORDERED_DICT
    negated = p_tensor(
        p_storage("FloatStorage", "0", 3), 0, (3,), (1,), p_dict({"neg": pickle.NEWTRUE})
    )
    pkl = p_top(
        NEW_ORDERED_DICT
        + pickle.MARK
        + p_str("param")
        + p_global("torch._utils", "_rebuild_parameter")
        + p_tuple(tensor, pickle.NEWTRUE, hooks)
        + pickle.REDUCE
        + p_str("param_with_state")
        + p_global("torch._utils", "_rebuild_parameter_with_state")
        + p_tuple(tensor, pickle.NEWTRUE, hooks, p_dict({"note": p_str("x")}))
        + pickle.REDUCE
        + p_str("negated")
        + negated
        + pickle.SETITEMS
    )
    loaded = load_torch_bin(make_zip(tmp_path / "m.bin", pkl, {"0": values.tobytes()}))
    assert list(loaded) == ["param", "param_with_state", "negated"]
    assert_same(loaded["param"], values)
    assert_same(loaded["param_with_state"], values)
    assert_same(loaded["negated"], -values)


def test_big_endian_byteorder_record(tmp_path):
    values = np.array([[1.5, -2.25], [3e38, 7.0]], np.float64)
    ints = np.array([1, -2, 2**40], np.int64)
    pkl = p_top(
        p_dict(
            {
                "f": p_tensor(p_storage("DoubleStorage", "0", 4), 0, (2, 2), (2, 1)),
                "i": p_tensor(p_storage("LongStorage", "1", 3), 0, (3,), (1,)),
            }
        )
    )
    storages = {"0": values.astype(">f8").tobytes(), "1": ints.astype(">i8").tobytes()}
    loaded = load_torch_bin(make_zip(tmp_path / "big.bin", pkl, storages, byteorder=b"big"))
    assert_same(loaded["f"], values)
    assert_same(loaded["i"], ints)
    # without a byteorder record the data is taken as little-endian, as torch does
    storages = {"0": values.astype("<f8").tobytes(), "1": ints.astype("<i8").tobytes()}
    loaded = load_torch_bin(make_zip(tmp_path / "none.bin", pkl, storages, byteorder=None))
    assert_same(loaded["f"], values)


@pytest.mark.parametrize("little", [True, False], ids=["little", "big"])
def test_legacy_format(tmp_path, little):
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    halves = np.array([0.5, -1.0], np.float16)
    pkl = p_top(
        NEW_ORDERED_DICT
        + pickle.MARK
        + p_str("weight")
        + p_tensor(p_storage("FloatStorage", "94011", 12), 0, (3, 4), (4, 1))
        + p_str("row")
        + p_tensor(p_storage("FloatStorage", "94011", 12), 4, (4,), (1,))
        + p_str("half")
        + p_tensor(p_storage("HalfStorage", "93999", 2), 0, (2,), (1,))
        + pickle.SETITEMS
    )
    path = make_legacy(tmp_path / "old.bin", pkl, {"94011": weights, "93999": halves}, little)
    loaded = load_torch_bin(path)
    assert list(loaded) == ["weight", "row", "half"]
    assert_same(loaded["weight"], weights)
    assert_same(loaded["row"], weights[1])
    assert_same(loaded["half"], halves.astype(np.float32))
    assert list_torch_bin(path)["half"] == ("float16", (2,))


def test_list_reads_only_the_pickle(tmp_path):
    pkl = p_top(p_dict({"w": p_tensor(p_storage("HalfStorage", "0", 6), 0, (2, 3), (3, 1))}))
    path = make_zip(tmp_path / "m.bin", pkl, {})  # no data records at all
    assert list_torch_bin(path) == {"w": ("float16", (2, 3))}
    with pytest.raises(TorchBinError, match=r"storage record my_model/data/0 is missing"):
        load_torch_bin(path)


def test_llama_fixture_round_trip(tmp_path):
    from safetensors.numpy import load_file

    tensors = load_file(FIXTURES / "llama" / "model.safetensors")
    write_torch_bin(tmp_path / "pytorch_model.bin", tensors)
    loaded = load_torch_bin(tmp_path / "pytorch_model.bin")
    assert sorted(loaded) == sorted(tensors)
    for name, want in tensors.items():
        assert_same(loaded[name], want)


# --- the writer's file ---------------------------------------------------------------------------


def test_writer_layout_matches_torch_save(tmp_path):
    path = tmp_path / "m.bin"
    write_torch_bin(path, {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.int64)})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == [
            "archive/data.pkl",
            "archive/.format_version",
            "archive/.storage_alignment",
            "archive/byteorder",
            "archive/data/0",
            "archive/data/1",
            "archive/version",
        ]
        assert archive.read("archive/version") == b"3\n"
        assert archive.read("archive/byteorder") == b"little"
        pkl = archive.read("archive/data.pkl")
    for info in infos:
        assert info.compress_type == zipfile.ZIP_STORED
        start = info.header_offset
        name_len, extra_len = struct.unpack("<HH", raw[start + 26 : start + 30])
        assert (start + 30 + name_len + extra_len) % 64 == 0, info.filename
    # the pickle, inspected without running it, names only what torch.load(weights_only) allows
    globals_named = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert globals_named == {
        "collections OrderedDict",
        "torch._utils _rebuild_tensor_v2",
        "torch FloatStorage",
        "torch LongStorage",
    }
    assert pkl[:2] == b"\x80\x02"


def test_writer_refuses_what_it_cannot_write(tmp_path):
    for bad in (np.zeros(2, np.complex64), np.zeros(2, np.uint16), np.array(["x"], object)):
        with pytest.raises(ValueError, match="cannot be written"):
            write_torch_bin(tmp_path / "m.bin", {"t": bad})
    with pytest.raises(TypeError, match="names must be strings"):
        write_torch_bin(tmp_path / "m.bin", {1: np.zeros(2)})


@pytest.mark.parametrize(
    "value", [0, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**63 + 5, -1, -(2**31), -(2**31) - 1]
)
def test_pickled_integers_cover_every_width(value):
    # element counts past 2**31 are real for big checkpoints; exercised here without the bytes
    assert pickle.loads(b"\x80\x02" + torch_bin_write._p_int(value) + b".") == value


# --- refusals -----------------------------------------------------------------------------------


def unsafe_payloads(marker: Path) -> dict[str, tuple[str, bytes]]:
    """Pickle fragments that would create `marker` if run, by the global they need."""
    touch = p_str(f"touch {marker}")
    return {
        "os.system": ("os.system", p_global("os", "system") + p_tuple(touch) + pickle.REDUCE),
        "posix.system": (
            "posix.system",
            p_global("posix", "system") + p_tuple(touch) + pickle.REDUCE,
        ),
        "builtins.eval": (
            "builtins.eval",
            p_global("builtins", "eval") + p_tuple(p_str(f"open('{marker}', 'w')")) + pickle.REDUCE,
        ),
        "builtins.open": (
            "builtins.open",
            p_global("builtins", "open") + p_tuple(p_str(str(marker)), p_str("w")) + pickle.REDUCE,
        ),
        "stack_global": (
            "os.system",
            p_str("os") + p_str("system") + pickle.STACK_GLOBAL + p_tuple(touch) + pickle.REDUCE,
        ),
        "inst": ("os.system", pickle.MARK + touch + pickle.INST + b"os\nsystem\n"),
        "module_class": (
            "torch.nn.modules.linear.Linear",
            p_global("torch.nn.modules.linear", "Linear") + pickle.EMPTY_TUPLE + pickle.REDUCE,
        ),
        "unsupported_tensor": (
            "torch._utils._rebuild_sparse_tensor",
            p_global("torch._utils", "_rebuild_sparse_tensor") + pickle.EMPTY_TUPLE + pickle.REDUCE,
        ),
        "unsupported_storage": (
            "torch.ComplexFloatStorage",
            p_tensor(p_storage("ComplexFloatStorage", "0", 1), 0, (1,), (1,)),
        ),
    }


@pytest.mark.parametrize("case", list(unsafe_payloads(Path("x"))))
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_forbidden_globals_are_refused_before_running(tmp_path, case, layout):
    marker = tmp_path / "pwned"
    forbidden, payload = unsafe_payloads(marker)[case]
    valid = p_tensor(p_storage("FloatStorage", "0", 2), 0, (2,), (1,))
    pkl = p_top(p_dict({"ok": valid, "evil": payload}))
    if layout == "zip":
        path = make_zip(tmp_path / "evil.bin", pkl, {"0": np.zeros(2, np.float32).tobytes()})
    else:
        path = make_legacy(tmp_path / "evil.bin", pkl, {"0": np.zeros(2, np.float32)})
    for read in (load_torch_bin, list_torch_bin):
        with pytest.raises(UnsafePickleError) as caught:
            read(path)
        message = str(caught.value)
        assert f"forbidden global {forbidden}" in message and str(path) in message
    assert isinstance(caught.value, ValueError)
    assert not marker.exists()


def test_forbidden_global_deep_inside_a_tensor(tmp_path):
    marker = tmp_path / "pwned"
    _, payload = unsafe_payloads(marker)["os.system"]
    # as the backward-hooks argument, where torch would have called it
    args = p_tuple(
        p_storage("FloatStorage", "0", 1),
        p_int(0),
        p_tuple(p_int(1)),
        p_tuple(p_int(1)),
        pickle.NEWFALSE,
        payload,
    )
    tensor = p_global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE
    path = make_zip(tmp_path / "evil.bin", p_top(p_dict({"w": tensor})), {"0": b"\0" * 4})
    with pytest.raises(UnsafePickleError, match="forbidden global os.system"):
        load_torch_bin(path)
    assert not marker.exists()


def test_allowed_objects_cannot_be_altered_by_a_pickle(tmp_path):
    # BUILD sets attributes on the object below it; the reader's stand-ins must refuse that, or
    # one file could change how later files load
    values = np.array([1.0, 2.0], np.float32)
    good = make_zip(
        tmp_path / "good.bin",
        p_top(p_dict({"w": p_tensor(p_storage("FloatStorage", "0", 2), 0, (2,), (1,))})),
        {"0": values.tobytes()},
    )
    slot_state = p_tuple(pickle.NONE, p_dict({"raw": p_str("object")}))
    for target in (
        p_global("torch", "FloatStorage"),
        p_global("torch._utils", "_rebuild_tensor_v2"),
        p_global("torch._utils", "_rebuild_parameter"),
        p_global("collections", "OrderedDict"),
        p_storage("FloatStorage", "0", 2),
        p_tensor(p_storage("FloatStorage", "0", 2), 0, (2,), (1,)),
    ):
        for state in (p_dict({"raw": p_str("object")}), slot_state):
            pkl = p_top(p_dict({"w": target + state + pickle.BUILD}))
            path = make_zip(tmp_path / "evil.bin", pkl, {"0": values.tobytes()})
            with pytest.raises(TorchBinError, match="tries to change a|not a valid pickle"):
                load_torch_bin(path)
    assert_same(load_torch_bin(good)["w"], values)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            pickle.EMPTY_LIST + pickle.MARK + p_int(1) + pickle.APPENDS,
            "holds an object of type list; expected a mapping of names to tensors",
        ),
        (p_tensor(p_storage("FloatStorage", "0", 2), 0, (2,), (1,)), "holds a tensor; expected"),
        (p_int(3), "holds an object of type int; expected"),
        (
            p_dict({"model": p_dict({}), "epoch": p_int(3)}),
            "entry 'model' is of type dict, not a tensor .a nested checkpoint",
        ),
        (p_dict({"step": p_int(3)}), "entry 'step' is of type int, not a tensor"),
        (
            pickle.EMPTY_DICT
            + p_int(1)
            + p_tensor(p_storage("FloatStorage", "0", 2), 0, (2,), (1,))
            + pickle.SETITEM,
            "non-string key 1",
        ),
    ],
    ids=["list", "tensor", "int", "nested", "non_tensor_value", "int_key"],
)
def test_only_a_mapping_of_names_to_tensors_is_accepted(tmp_path, body, message):
    path = make_zip(tmp_path / "m.bin", p_top(body), {"0": np.zeros(2, np.float32).tobytes()})
    for read in (load_torch_bin, list_torch_bin):
        with pytest.raises(TorchBinError, match=message):
            read(path)


def test_inconsistent_tensor_descriptions_are_refused(tmp_path):
    data = {"0": np.zeros(4, np.float32).tobytes()}
    cases = {
        "reaches element 4 of storage '0', which holds 4": p_tensor(
            p_storage("FloatStorage", "0", 4), 0, (5,), (1,)
        ),
        "reaches element 5 of storage": p_tensor(
            p_storage("FloatStorage", "0", 4), 1, (2, 2), (3, 1)
        ),
        "holds 16 bytes, but the pickle declares 5 float32 values": p_tensor(
            p_storage("FloatStorage", "0", 5), 0, (5,), (1,)
        ),
        "size .2, 2. and stride .1,. differ": p_tensor(
            p_storage("FloatStorage", "0", 4), 0, (2, 2), (1,)
        ),
        "unsupported persistent id": p_global("torch._utils", "_rebuild_tensor_v2")
        + p_tuple(p_str("x") + pickle.BINPERSID, p_int(0), p_tuple(), p_tuple(), pickle.NEWFALSE)
        + pickle.REDUCE,
    }
    for message, tensor in cases.items():
        path = make_zip(tmp_path / "m.bin", p_top(p_dict({"w": tensor})), data)
        with pytest.raises(TorchBinError, match=message):
            load_torch_bin(path)


@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "good.bin"
    tensors = {"marker": np.full(64, 7.0, np.float32), "b": np.arange(10, dtype=np.int64)}
    write_torch_bin(path, tensors)
    return path


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -10])
def test_truncated_file_gives_a_clear_error(tmp_path, good_file, keep):
    raw = good_file.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(raw[: int(len(raw) * keep)] if keep > 0 else raw[:keep])
    with pytest.raises(TorchBinError, match=r"cut\.bin: not a readable zip archive .truncated"):
        load_torch_bin(cut)


def test_corrupt_bytes_give_a_clear_error(tmp_path, good_file):
    raw = bytearray(good_file.read_bytes())
    at = raw.find(np.full(64, 7.0, np.float32).tobytes())
    raw[at + 100] ^= 0xFF
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    assert list(list_torch_bin(bad)) == ["marker", "b"]  # the pickle itself is intact
    with pytest.raises(TorchBinError, match=r"bad\.bin: storage record .* is unreadable .corrupt"):
        load_torch_bin(bad)
    raw = bytearray(good_file.read_bytes())
    at = raw.find(b"_rebuild_tensor_v2")
    raw[at] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(TorchBinError, match=r"record archive/data\.pkl is unreadable .corrupt"):
        load_torch_bin(bad)


def test_files_that_are_not_torch_checkpoints(tmp_path):
    from safetensors.numpy import save_file

    cases = {
        "empty.bin": (b"", "the file is empty"),
        "text.bin": (b"hello, world", "not a PyTorch checkpoint: it starts with b'hell'"),
        "pickle.bin": (pickle.dumps({"a": 1}, protocol=2), "without torch's magic number"),
        "garbage_pkl.bin": (None, "my_model/data.pkl is not a valid pickle"),
        "no_pkl.bin": (None, "has 0 <folder>/data.pkl records"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if name == "garbage_pkl.bin":
            make_zip(path, b"\x80\x02this is not a pickle", {})
        elif name == "no_pkl.bin":
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("model/weights", b"\0" * 8)
        else:
            path.write_bytes(content)
        with pytest.raises(TorchBinError, match=f"{name}: .*{message}"):
            load_torch_bin(path)
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TorchBinError, match="not a PyTorch checkpoint"):
        load_torch_bin(tmp_path / "model.safetensors")
