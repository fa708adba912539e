"""The security boundary of reading PyTorch checkpoints: a pickle that can only rebuild tensors.

torch.save pickles the state dict, and loading an arbitrary pickle can execute arbitrary code.
Here the pickle is read by a restricted unpickler: it resolves only the globals torch uses to
rebuild plain tensors (plus `collections.OrderedDict` and the typed storage classes), and each
of those resolves to a local stand-in that merely records storage key, offset, shape and stride
(`StorageRef`, `TensorRef`), each view checked against its storage. Any other global stops the
load with `UnsafePickleError` before anything runs. The globals and persistent ids accepted are
those torch.save emits (`torch._utils._rebuild_tensor_v2`, `torch.serialization`'s storage
ids); `torch_bin` opens the file and reads the bytes the references point to.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .io import CheckpointError

__all__ = [
    "StorageRef",
    "TensorRef",
    "TorchBinError",
    "UnsafePickleError",
    "state_dict",
    "unpickle",
]


class TorchBinError(CheckpointError):
    """A file that cannot be read as a PyTorch checkpoint of plain tensors."""


class UnsafePickleError(TorchBinError):
    """The checkpoint's pickle names a global outside the tensor-rebuilding allowlist."""


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
        raise TorchBinError(f"tensor {what} {value!r} is not a tuple of non-negative integers")
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
        raise TorchBinError(f"tensor storage offset {storage_offset!r} is not a non-negative int")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise TorchBinError(f"tensor size {shape} and stride {strides} differ in length")
    negate = False
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
            raise TorchBinError(f"unsupported tensor metadata {metadata!r}")
        if metadata.get("conj"):
            raise TorchBinError("tensor has the conjugate bit set; complex tensors are unsupported")
        negate = bool(metadata.get("neg"))
        if negate and storage.type.dtype == "bool":
            raise TorchBinError("a bool tensor cannot have the negation bit set")
    # as_strided trusts its arguments, so an out-of-range view must be refused here
    if 0 not in shape:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise TorchBinError(
                f"tensor view (offset {storage_offset}, size {shape}, stride {strides}) reaches "
                f"element {last} of storage {storage.key!r}, which holds {storage.numel}"
            )
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

    def __init__(self, file: BinaryIO):
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
            f"pickle references forbidden global {module}.{name}: {why}; "
            "refused before anything ran"
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        # zip layout: ('storage', type, key, location, numel); legacy appends view metadata
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise TorchBinError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, location, numel = pid[:5]
        if len(pid) == 6 and pid[5] is not None:
            raise TorchBinError("storage views (torch < 1.0 checkpoints) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise TorchBinError(f"persistent id names {storage_type!r}, not a storage type")
        if not isinstance(key, str) or not isinstance(location, str):
            raise TorchBinError(f"storage key {key!r} or location {location!r} is not a string")
        if not _is_int(numel) or numel < 0:
            raise TorchBinError(f"storage {key!r} has invalid element count {numel!r}")
        ref = StorageRef(key, storage_type, numel)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise TorchBinError(f"storage {key!r} is declared twice with different types or sizes")
        return known


def unpickle(file: BinaryIO, what: str) -> tuple[Any, dict[str, StorageRef]]:
    """Load one pickle from file with the restricted unpickler: (object, storages it named)."""
    unpickler = _RestrictedUnpickler(file)
    try:
        return unpickler.load(), unpickler.storages
    except TorchBinError:
        raise
    except Exception as exc:  # whatever decoding untrusted bytes raises means the file is bad
        raise TorchBinError(
            f"{what} is not a valid pickle (corrupt or truncated file?): "
            f"{type(exc).__name__}: {exc}"
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
            raise TorchBinError(f"the checkpoint has a non-string key {name!r}")
        if not isinstance(value, TensorRef):
            hint = ""
            if isinstance(value, dict):
                hint = " (a nested checkpoint? save model.state_dict() itself)"
            raise TorchBinError(
                f"entry {name!r} is of type {type(value).__name__}, not a tensor{hint}"
            )
    return dict(root)
