"""A restricted unpickler for the two protocols that carry pickles.

``pickle.loads`` runs whatever callables a payload names (``os.system``,
``builtins.exec``, ...), so unpickling untrusted bytes lets the sender run
code on the server. :func:`loads` only resolves the globals in an explicit
allow-list (plain builtins containers, numpy arrays, torch tensors, LeRobot's
async-inference dataclasses) and refuses everything else with
:class:`UnsafePickle` *before* anything is called.

Torch's own tensor pickles rebuild storages through
``torch.storage._load_from_bytes``, which calls ``torch.load`` with
``weights_only=False``: an unrestricted unpickler again. It is swapped for a
version that loads with ``weights_only=True``.

Legacy clients pickle instances of their own classes, which the server
cannot (and must not) import. ``records`` names such classes
(``"module:Class"``); they are rebuilt as :class:`Record`, a plain attribute
bag, and their own code is never imported.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ProtocolError

__all__ = ["loads", "UnsafePickle", "Record", "SAFE_GLOBALS"]


class UnsafePickle(ProtocolError):
    """The payload names a global the restricted unpickler does not admit."""


#: ``(module, name)`` pairs a payload may name. Each is data-only: building it runs no user code.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "complex", "bool", "slice", "range", "object")]
    + [("collections", "OrderedDict"), ("collections", "defaultdict"), ("copyreg", "_reconstructor")]
    # numpy arrays, scalars and dtypes (numpy 1 and 2 module names)
    + [(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("numpy.dtypes", name) for name in ("Float32DType", "Float64DType", "Float16DType", "UInt8DType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt16DType", "BoolDType", "StrDType")]
    # torch tensors (storages are rebuilt by _safe_load_from_bytes below)
    + [("torch._utils", name) for name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter")]
    + [("torch", "Size"), ("torch", "device"), ("torch", "float32"), ("torch", "float64"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "uint8"), ("torch", "int64"), ("torch", "int32"), ("torch", "bool")]
    + [("torch", name) for name in ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "ByteStorage", "LongStorage", "IntStorage", "BoolStorage")]
    # LeRobot 0.4.4's async-inference messages
    + [("lerobot.async_inference.helpers", name) for name in ("TimedObservation", "TimedAction", "RemotePolicyConfig", "TimedData")]
    + [("lerobot.configs.types", name) for name in ("PolicyFeature", "FeatureType", "NormalizationMode")]
)


class Record:
    """A legacy client's object, rebuilt as a bag of attributes (its class is never imported)."""

    _class_name = "Record"

    def __repr__(self) -> str:
        return f"<{self._class_name} {sorted(vars(self))}>"

    def __reduce__(self) -> Any:  # a reply never pickles a Record back as a foreign class
        return (dict, (vars(self),))


def _record_class(module: str, name: str) -> type[Record]:
    return type(name, (Record,), {"_class_name": f"{module}.{name}", "__module__": __name__})


def _safe_load_from_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, records: Iterable[str]) -> None:
        super().__init__(file)
        self._records = {tuple(spec.split(":", 1)): None for spec in records}
        self._record_types: dict[tuple[str, str], type[Record]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._records:
            return self._record_types.setdefault((module, name), _record_class(module, name))
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _safe_load_from_bytes
        if (module, name) not in SAFE_GLOBALS:
            raise UnsafePickle(f"refusing to unpickle {module}.{name}: only numpy arrays, torch tensors, builtins and LeRobot's async-inference classes are admitted")
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("refusing a pickle with persistent ids")


def loads(data: bytes, records: Iterable[str] = (), check: Callable[[Any], None] | None = None) -> Any:
    """Unpickle ``data`` admitting only :data:`SAFE_GLOBALS` (and ``records``).

    Raises :class:`UnsafePickle` for a forbidden global and
    :class:`~policylink.errors.ProtocolError` for a malformed pickle.
    """
    try:
        value = _RestrictedUnpickler(io.BytesIO(data), records).load()
    except ProtocolError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many kinds
        raise ProtocolError(f"malformed pickle: {type(exc).__name__}: {exc}") from None
    if check is not None:
        check(value)
    return value
