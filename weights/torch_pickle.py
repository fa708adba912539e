"""The security boundary of reading PyTorch checkpoints: a pickle that can only rebuild tensors.

torch.save pickles the state dict, and loading an arbitrary pickle can execute arbitrary code.
Here the pickle is read by a restricted unpickler: it resolves only the globals torch uses to
rebuild plain tensors (plus `collections.OrderedDict` and the typed storage classes), and each
of those resolves to a local stand-in that merely records storage key, offset, shape and stride
(`StorageRef`, `TensorRef`), each view checked against its storage. Any other global stops the
load with `UnsafePickleError` before anything runs. The globals and persistent ids accepted are
those torch.save emits (`torch._utils._rebuild_tensor_v2`, `torch.serialization`'s storage
ids); `torch_bin` opens the file and reads the bytes the references point to.

Before the unpickler runs, `scan` walks the opcode stream once, iteratively, and refuses what
could exhaust the process without running code: more than MAX_PICKLE_BYTES or MAX_OPCODES,
objects nested more than MAX_DEPTH deep, dict keys that are not plain values (a key is hashed,
and hashing a 200,000-deep tuple overflows the C stack, while `t = (t, t)` built 80 times via
the memo takes 2**80 steps) or that repeat in one dict (the last would silently win), sets,
integers wider than MAX_INT_BITS, memo indices beyond the memo (the unpickler sizes its memo
by the index) and objects changed after being nested (which would let depth grow unseen). So
the unpickler's work is linear in the pickle's size, and no attacker-built structure is
hashed, compared or repr'd unbounded: messages show values through `shown`. A tensor may hold
no more elements than its storage, so a stride-0 view cannot expand a small file into a huge
array.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimllm.reference.errors import clip, shown

from .io import CheckpointError

__all__ = [
    "MAX_PICKLE_BYTES",
    "StorageRef",
    "TensorRef",
    "TorchBinError",
    "UnsafePickleError",
    "scan",
    "state_dict",
    "unpickle",
]

MAX_PICKLE_BYTES = 32 << 20  # torch.save writes ~100 bytes per tensor: 300,000 tensors fit
MAX_OPCODES = 1 << 21  # about 35 opcodes per tensor
MAX_DEPTH = 32  # a state dict nests 4 deep (dict, tensor call, arguments, shape)
MAX_INT_BITS = 128  # room for the legacy magic number (80 bits) and any int64
MAX_SPAN = 1 << 48  # the most elements a tensor's sizes may span, counting only non-zero sizes


class TorchBinError(CheckpointError):
    """A file that cannot be read as a PyTorch checkpoint of plain tensors."""


class UnsafePickleError(TorchBinError):
    """The checkpoint's pickle names a global outside the tensor-rebuilding allowlist."""


# --- the pre-scan: what the unpickler may build -----------------------------------------------


class _Built:
    """What the scan knows of one object the unpickler will build (shared by memo copies)."""

    __slots__ = ("depth", "key", "value", "nested", "empty", "keys")

    def __init__(self, depth: int = 0, key: bool = False, value: Any = None, empty=False):
        self.depth = depth  # containers around the deepest plain value
        self.key = key  # a plain value, cheap to hash: may be a dict key
        self.value = value  # a plain value's value; a global's "module name"
        self.nested = False  # placed inside another object: must not change any more
        self.empty = empty  # the empty tuple (the only arguments OrderedDict may take)
        self.keys: set | None = None  # the keys set in it so far, if it is a dict


# opcodes pushing one plain value
_PLAIN = {op.name for op in pickletools.opcodes if op.name.endswith(("INT", "LONG", "FLOAT"))}
_PLAIN |= {"LONG1", "LONG4", "BININT1", "BININT2", "NONE", "NEWTRUE", "NEWFALSE"}
_PLAIN |= {"STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_PLAIN |= {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_REFUSED = {
    "EMPTY_SET": "a set",
    "ADDITEMS": "a set",
    "FROZENSET": "a frozenset",
    "EXT1": "a copyreg extension",
    "EXT2": "a copyreg extension",
    "EXT4": "a copyreg extension",
    "NEXT_BUFFER": "an out-of-band buffer",
    "READONLY_BUFFER": "an out-of-band buffer",
}
_ORDERED_DICT = "collections OrderedDict"


class _Scan:
    """The unpickler's stack, mark and memo, holding `_Built` records instead of objects."""

    def __init__(self, what: str):
        self.what = what
        self.stack: list[_Built] = []
        self.marks: list[int] = []
        self.memo: dict[int, _Built] = {}

    def refuse(self, why: str, pos: int) -> TorchBinError:
        return TorchBinError(f"{self.what} is refused: {why} (at byte {pos})")

    def pop(self) -> _Built:
        if not self.stack or (self.marks and len(self.stack) == self.marks[-1]):
            raise ValueError("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[_Built]:
        at = self.marks.pop()  # IndexError without a mark: the pickle is invalid
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def made(self, parts: list[_Built], pos: int, **kind: Any) -> _Built:
        """A new object built from parts: one level deeper than the deepest of them."""
        for part in parts:
            part.nested = True
        built = _Built(1 + max((p.depth for p in parts), default=0), **kind)
        return self.deep_enough(built, pos)

    def deep_enough(self, built: _Built, pos: int) -> _Built:
        if built.depth > MAX_DEPTH:
            raise self.refuse(f"objects nested more than {MAX_DEPTH} deep", pos)
        return built

    def fill(self, target: _Built, parts: list[_Built], pos: int) -> None:
        """APPEND, SETITEM, BUILD...: target gains parts, so it gets deeper."""
        if target.nested:
            # its container's depth was counted already: changing it now could hide depth
            raise self.refuse("an object is changed after being placed in another", pos)
        for part in parts:
            part.nested = True
            target.depth = max(target.depth, 1 + part.depth)
        self.deep_enough(target, pos)

    def keys(self, target: _Built, items: list[_Built], pos: int) -> None:
        """items alternate key, value: each key must be a plain value (hashing it is cheap), and
        new to the dict (a name set twice would silently keep the last tensor)."""
        if len(items) % 2:
            raise ValueError("odd number of dict items")
        if not all(k.key for k in items[::2]):
            raise self.refuse("a dict key that is not a string or number", pos)
        target.keys = target.keys or set()
        for k in items[::2]:
            if k.value in target.keys:
                raise self.refuse(f"the key {shown(k.value)} is set twice in one dict", pos)
            target.keys.add(k.value)

    def call(self, func: _Built, args: list[_Built], pos: int) -> None:
        """OrderedDict(pairs) would hash the keys of pairs: torch calls it without arguments."""
        if func.value == _ORDERED_DICT and any(not a.empty for a in args):
            raise self.refuse("OrderedDict is called with arguments", pos)

    def step(self, name: str, arg: Any, pos: int, end: int) -> None:
        stack = self.stack
        if name in _REFUSED:
            raise self.refuse(f"it builds {_REFUSED[name]}, which a checkpoint never holds", pos)
        if name in _PLAIN:
            if isinstance(arg, int) and abs(arg).bit_length() > MAX_INT_BITS:
                raise self.refuse(f"an integer wider than {MAX_INT_BITS} bits", pos)
            value = {"NEWTRUE": True, "NEWFALSE": False}.get(name, arg)
            stack.append(_Built(key=True, value=value))
        elif name in ("PROTO", "STOP"):
            pass
        elif name == "FRAME":
            if arg > end - pos:
                raise self.refuse(f"a frame of {arg} bytes runs past the end", pos)
        elif name == "MARK":
            self.marks.append(len(stack))
        elif name == "POP":
            if self.marks and self.marks[-1] == len(stack):
                self.marks.pop()  # as the C unpickler does: POP on a mark drops the mark
            else:
                self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(self.memo) if name == "MEMOIZE" else arg
            if index > len(self.memo):  # the unpickler's memo grows to twice the index
                raise self.refuse(f"memo index {index} skips past the {len(self.memo)} used", pos)
            self.memo[index] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise ValueError(f"memo index {arg} was never set")
            stack.append(self.memo[arg])
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "BYTEARRAY8", "PERSID"):
            stack.append(_Built(1))
        elif name == "EMPTY_TUPLE":
            stack.append(_Built(1, empty=True))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            parts = [self.pop() for _ in range(int(name[-1]))]
            stack.append(self.made(parts, pos))
        elif name in ("TUPLE", "LIST"):
            stack.append(self.made(self.pop_mark(), pos))
        elif name == "DICT":
            items = self.pop_mark()
            built = self.made(items, pos)
            self.keys(built, items, pos)
            stack.append(built)
        elif name == "APPEND":
            item = self.pop()
            self.fill(stack[-1], [item], pos)
        elif name == "SETITEM":
            items = [self.pop(), self.pop()][::-1]
            self.keys(stack[-1], items, pos)
            self.fill(stack[-1], items, pos)
        elif name in ("APPENDS", "SETITEMS"):
            items = self.pop_mark()
            if name == "SETITEMS":
                self.keys(stack[-1], items, pos)
            self.fill(stack[-1], items, pos)
        elif name == "BUILD":
            state = self.pop()
            self.fill(stack[-1], [state], pos)
        elif name == "GLOBAL":
            stack.append(_Built(value=arg))
        elif name == "STACK_GLOBAL":
            module_name = [self.pop(), self.pop()][::-1]
            stack.append(_Built(value=f"{module_name[0].value} {module_name[1].value}"))
        elif name == "BINPERSID":
            stack.append(self.made([self.pop()], pos))
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            parts = [self.pop() for _ in range(3 if name == "NEWOBJ_EX" else 2)][::-1]
            self.call(parts[0], parts[1:], pos)
            stack.append(self.made(parts, pos))
        elif name in ("OBJ", "INST"):
            parts = self.pop_mark()
            func = _Built(value=arg) if name == "INST" else parts[0]
            self.call(func, parts if name == "INST" else parts[1:], pos)
            stack.append(self.made(parts, pos))
        else:  # a new protocol's opcode
            raise self.refuse(f"unknown opcode {name}", pos)


def scan(data: bytes, what: str, start: int = 0) -> int:
    """Check the pickle at data[start:] opcode by opcode (see the module note) without building
    anything; returns the offset just past its STOP."""
    state = _Scan(what)
    stream = io.BytesIO(data)
    stream.seek(start)
    # genops decodes protocol-0 STRING arguments, warning of escapes Python will one day refuse
    # (a hostile file may hold any): a scan prints nothing
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
        try:
            for count, (op, arg, pos) in enumerate(pickletools.genops(stream)):
                if pos - start >= MAX_PICKLE_BYTES or count >= MAX_OPCODES:
                    limit = f"{MAX_PICKLE_BYTES} bytes or {MAX_OPCODES} opcodes"
                    raise TorchBinError(f"{what} is refused: longer than {limit}")
                state.step(op.name, arg, pos, len(data))
                if op.name == "STOP":
                    return pos + 1
        except TorchBinError:
            raise
        except (ValueError, IndexError, TypeError) as exc:  # what genops and the stack model raise
            raise TorchBinError(
                f"{what} is not a valid pickle (corrupt or truncated file?): {clip(str(exc))}"
            ) from None
    raise TorchBinError(f"{what} is not a valid pickle: it has no STOP")  # genops raises first


# --- what the pickle may contain --------------------------------------------------------------


class _Sealed:
    """Base of the objects the unpickler hands out: a pickle may not change them.

    BUILD sets state through __setstate__, and these objects are shared between loads or
    trusted for sizes later, so one file must not be able to alter them.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TorchBinError(f"the pickle tries to change a {type(self).__name__.lstrip('_')}")


# Not slots=True: that makes dataclasses generate a __setstate__ which ignores frozen.
@dataclass(frozen=True)
class _StorageType(_Sealed):
    name: str  # torch class name, e.g. "FloatStorage"
    dtype: str  # dtype name of the stored values, e.g. "bfloat16"
    raw: np.dtype  # how the bytes are read: bfloat16 as its uint16 bits, bool as uint8


_STORAGE_TYPES = {
    t.name: t
    for t in (
        _StorageType("FloatStorage", "float32", np.dtype(np.float32)),
        _StorageType("HalfStorage", "float16", np.dtype(np.float16)),
        _StorageType("BFloat16Storage", "bfloat16", np.dtype(np.uint16)),
        _StorageType("DoubleStorage", "float64", np.dtype(np.float64)),
        _StorageType("LongStorage", "int64", np.dtype(np.int64)),
        _StorageType("IntStorage", "int32", np.dtype(np.int32)),
        _StorageType("ShortStorage", "int16", np.dtype(np.int16)),
        _StorageType("CharStorage", "int8", np.dtype(np.int8)),
        _StorageType("ByteStorage", "uint8", np.dtype(np.uint8)),
        _StorageType("BoolStorage", "bool", np.dtype(np.uint8)),
    )
}


@dataclass(frozen=True)
class StorageRef(_Sealed):
    key: str
    type: _StorageType
    numel: int


@dataclass(frozen=True)
class TensorRef(_Sealed):
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    negate: bool  # torch's lazy "neg" bit: the stored values are the negated tensor


@dataclass(frozen=True)
class _StandIn(_Sealed):
    """What an allowed function global resolves to: calls a local function, immutably."""

    func: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.func(*args)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(_is_int(v) and v >= 0 for v in value):
        raise TorchBinError(f"tensor {what} {shown(value)} is not a tuple of non-negative integers")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    """Stand-in for torch._utils._rebuild_tensor_v2: the view, checked against its storage."""
    if not isinstance(storage, StorageRef):
        raise TorchBinError(f"tensor storage is {type(storage).__name__}, not a storage reference")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise TorchBinError(
            f"tensor storage offset {shown(storage_offset)} is not a non-negative int"
        )
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise TorchBinError(f"tensor size {shape} and stride {strides} differ in length")
    negate = False
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
            raise TorchBinError(f"unsupported tensor metadata {shown(metadata)}")
        if metadata.get("conj"):
            raise TorchBinError("tensor has the conjugate bit set; complex tensors are unsupported")
        negate = bool(metadata.get("neg"))
        if negate and storage.type.dtype == "bool":
            raise TorchBinError("a bool tensor cannot have the negation bit set")
    view = f"tensor view (offset {storage_offset}, size {shown(shape)}, stride {shown(strides)})"
    # as_strided trusts its arguments, so an out-of-range view must be refused here
    if 0 not in shape:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise TorchBinError(
                f"{view} reaches element {last} of storage {shown(storage.key)}, "
                f"which holds {storage.numel}"
            )
    # A view may repeat elements (stride 0, overlapping rows), but copying it must not make
    # more than the file holds: one element of storage could otherwise become terabytes.
    if math.prod(n for n in shape if n) > MAX_SPAN:  # NumPy refuses even empty ones past this
        raise TorchBinError(f"{view} spans more than {MAX_SPAN} elements")
    if math.prod(shape) > storage.numel:
        raise TorchBinError(
            f"{view} has {math.prod(shape)} elements, more than the {storage.numel} of its "
            f"storage {shown(storage.key)} (a stride-0 or overlapping view)"
        )
    # a size-1 dimension's stride moves nowhere; 0 keeps NumPy's byte strides small
    strides = tuple(0 if n == 1 else s for n, s in zip(shape, strides, strict=True))
    return TensorRef(storage, storage_offset, shape, strides, negate)


def _rebuild_parameter(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None
) -> Any:
    """Stand-in for torch._utils._rebuild_parameter(_with_state): a parameter is its tensor."""
    if not isinstance(data, TensorRef):
        raise TorchBinError(f"parameter data is {type(data).__name__}, not a tensor")
    return data


_ALLOWED_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _StandIn(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _StandIn(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _StandIn(_rebuild_parameter),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only the tensor-rebuilding globals; storages become StorageRef."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[module, name]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        why = "only plain tensors in a mapping may appear in a checkpoint"
        if (module == "torch" and name.endswith("Storage")) or module == "torch._utils":
            # torch's own, and harmless, but for tensor kinds this reader does not handle
            why = "it builds a tensor type this reader does not support (complex, uint16, ...)"
        raise UnsafePickleError(
            f"pickle references forbidden global {clip(f'{module}.{name}')}: {why}; "
            "refused before anything ran"
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        # zip layout: ('storage', type, key, location, numel); legacy appends view metadata
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise TorchBinError(f"unsupported persistent id {shown(pid)}")
        _, storage_type, key, location, numel = pid[:5]
        if len(pid) == 6 and pid[5] is not None:
            raise TorchBinError("storage views (torch < 1.0 checkpoints) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise TorchBinError(f"persistent id names {shown(storage_type)}, not a storage type")
        if not isinstance(key, str) or not isinstance(location, str):
            raise TorchBinError(
                f"storage key {shown(key)} or location {shown(location)} is not a string"
            )
        if not _is_int(numel) or numel < 0:
            raise TorchBinError(f"storage {shown(key)} has invalid element count {shown(numel)}")
        ref = StorageRef(key, storage_type, numel)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise TorchBinError(
                f"storage {shown(key)} is declared twice with different types or sizes"
            )
        return known


def unpickle(data: bytes, what: str, start: int = 0) -> tuple[Any, dict[str, StorageRef], int]:
    """The pickle at data[start:], checked by `scan` and then loaded by the restricted unpickler:
    (object, storages it named, the offset just past it)."""
    end = scan(data, what, start)
    stream = io.BytesIO(data)
    stream.seek(start)
    unpickler = _RestrictedUnpickler(stream)
    try:
        return unpickler.load(), unpickler.storages, end
    except TorchBinError:
        raise
    except Exception as exc:  # whatever decoding untrusted bytes raises means the file is bad
        raise TorchBinError(
            f"{what} is not a valid pickle (corrupt or truncated file?): "
            f"{type(exc).__name__}: {clip(str(exc))}"
        ) from exc


def state_dict(root: Any) -> dict[str, TensorRef]:
    """The pickled object as name -> tensor, or a clear error for any other structure."""
    if not isinstance(root, dict):
        kind = (
            "a tensor"
            if isinstance(root, TensorRef)
            else f"an object of type {type(root).__name__}"
        )
        raise TorchBinError(
            f"the checkpoint holds {kind}; expected a mapping of names to tensors (a state_dict)"
        )
    for name, value in root.items():
        if not isinstance(name, str):
            raise TorchBinError(f"the checkpoint has a non-string key {shown(name)}")
        if not isinstance(value, TensorRef):
            hint = ""
            if isinstance(value, dict):
                hint = " (a nested checkpoint? save model.state_dict() itself)"
            raise TorchBinError(
                f"entry {shown(name)} is of type {type(value).__name__}, not a tensor{hint}"
            )
    return dict(root)
