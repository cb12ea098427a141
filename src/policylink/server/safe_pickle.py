"""A restricted, bounded unpickler for the two protocols that carry pickles.

``pickle.loads`` runs whatever callables a payload names (``os.system``,
``builtins.exec``, ...), so unpickling untrusted bytes lets the sender run
code on the server. :func:`loads` only resolves the globals in an explicit
allow-list (plain builtins containers, numpy arrays, torch tensors, LeRobot's
async-inference dataclasses) and refuses everything else with
:class:`UnsafePickle` *before* anything is called.

Legacy clients pickle instances of their own classes, which the server
cannot (and must not) import. ``records`` names such classes
(``"module:Class"``); they are rebuilt as :class:`Record`, a plain attribute
bag, and their own code is never imported.

What is bounded, and why
------------------------
Admitting only harmless callables is not enough: a 61-byte pickle of
``list(range(25_000_000))`` made the server allocate 870 MB and stall every
client for 0.85 s, and the pickle machine itself multiplies its input
(``DUP``/``BINGET`` + ``APPENDS``: 1 byte per list slot; ``EMPTY_SET``: 1
byte per 216-byte set; ``MARK``: 1 byte per list). Every load runs against a
budget, checked *before* the work is done; a payload past it is refused with
an :class:`UnsafePickle` that names the limit:

- ``max_ops`` (default 100_000): opcodes the pickle machine executes.
  ``EMPTY_SET``/``FROZENSET`` count 4, ``EMPTY_DICT``/``DICT`` 2, a call or
  ``BUILD`` 16, a number or tuple used as a dict key or set element 2 (or
  its leaf count), a torch storage 256. One unit is at most ~0.3 us and ~80
  bytes, so a refused payload costs at most ~30 ms and ~8 MB, however large
  it is (a pickled Python list of ~90_000 floats still fits). What is read
  straight from the payload (strings, bytes, big ints) is at most the
  payload's own size.
- ``max_elements`` (default 1_000_000): elements that *calls* build or
  consume, summed over the load (``list(x)``, ``tuple(x)``, ``set(x)``,
  ``dict(x)``, ``copyreg._reconstructor(list, list, x)``, ``bytes(range)``,
  digits of numbers parsed from text, items of an object array...): at most
  ~40 ms of C work and ~70 MB.
- ``max_bytes`` (default 64 MiB, the servers' default message limit): bytes
  that calls allocate, summed over the load (``bytes(n)``, ``bytearray(n)``,
  containers, decoded text, numpy arrays from ``_reconstruct`` and
  ``ndarray.__setstate__``, numpy scalars, torch storages, tensor views that
  claim more than their storage holds). The budget is never below twice the
  payload's size, so a server with a larger message limit keeps accepting
  what fits it (a 4096x4096x3 frame, 48 MiB, fits the default).

The cyclic garbage collector is paused during a load (and restored after
it): with 100_000 freshly made lists alive, its passes made a ``MARK`` bomb
take 0.4 s instead of 0.03 s.

Each admitted callable has a check run on its arguments before the call:
sizes of sized arguments and ranges, integer sizes, lengths of text turned
into numbers (4300 characters, Python's own limit for decimal text) or
decoded (UTF-8/Latin-1/ASCII only: other codecs import modules), numpy
shapes (32 dimensions at most) times ``itemsize``, torch ``size``/``stride``
against the storage they index; calls that only make sense as values
(``numpy.ndarray``, numpy DType classes, torch storage classes) are refused.
Checks that guard memory safety or other clients rather than size:

- an object array's item list must match its shape (numpy 2.2 segfaults
  otherwise);
- a dtype's ``__setstate__`` may not resize the item, place fields outside
  it, or set the ``HASOBJECT``/``REFCOUNT``/``IS_POINTER`` flags (numpy
  accepts all three: out-of-bounds reads, payload bytes used as object
  pointers), and ``numpy.dtype`` is always called with ``copy=True``;
- ``BUILD`` only fills objects this pickle created, and
  ``APPEND(S)``/``SETITEM(S)``/``ADDITEMS`` only builtin lists, dicts and
  sets: otherwise a payload could rewrite a LeRobot enum member, a LeRobot
  class or numpy's shared ``uint8`` dtype for every later client;
- dict keys and set elements hash in bounded time: ints of at most 64 bits,
  tuples of at most 64 leaves (tuples do not cache their hash, and hashing a
  tuple DAG shared 60 levels deep takes 2**60 steps), and at most 16 distinct
  keys of one container may share a hash value (numbers and tuples of
  numbers hash predictably: 20_000 crafted ints made one set take 2 s).

Torch's own tensor pickles rebuild storages with
``torch.storage._load_from_bytes``, i.e. ``torch.load(weights_only=False)``
on a legacy-format stream, which allocates the element count the stream
claims before reading the bytes and restores the storage onto whatever
device the stream names (a GPU). That stream (five small pickles, an element
count, the raw bytes) is parsed here instead, by the same restricted
unpickler and budget: the count must match the bytes present, storages land
on the CPU, and ``torch.load`` is never called.

C or pure-Python unpickler
--------------------------
``pickle.Unpickler`` (C) lets a subclass override only ``find_class`` and
``persistent_load``: nothing could count opcodes, see ``BUILD`` targets or
``APPENDS``/``SETITEMS`` contents, and it has bombs of its own (a 7-byte
``LONG_BINPUT 100000000`` stalls it 1.9 s zeroing a memo array). This module
subclasses ``pickle._Unpickler`` (pure Python, a stdlib-internal class) and
replaces its main loop and the dispatch entries of the opcodes that call,
fill or allocate. Measured on a LeRobot ``TimedObservation`` with three
480x640x3 uint8 cameras (2.8 MB, ~200 opcodes; median of 50, 2-core CPU):

==========================  ==========  ==========
unpickler                   numpy       torch
==========================  ==========  ==========
``pickle.loads`` (C)        0.20 ms     0.79 ms
previous safe_pickle (C)    0.21 ms     1.03 ms
``pickle._Unpickler``       0.28 ms     0.89 ms
this module                 0.34 ms     1.06 ms
==========================  ==========  ==========

Well under a millisecond apart: such payloads are a few hundred opcodes
around large byte strings. Hostile opcode streams are ~4x slower in Python
(~0.2 us vs 0.05 us per opcode), which ``max_ops`` bounds.

Imports
-------
:func:`prepare` imports every module the allow-list names (numpy, torch,
LeRobot, when installed) and resolves the globals once; call it at server
start-up. :meth:`find_class` only looks names up in that table, so no request
ever imports anything (the first torch tensor used to import torch inside a
request: a 1.2 s stall for everyone); a global whose module was not
importable is refused. :func:`loads` calls :func:`prepare` itself if nobody
did, so it keeps working, but then the first request pays for the imports.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import contextlib
import enum
import gc
import importlib
import io
import logging
import math
import pickle
import sys
import threading
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..errors import ProtocolError

__all__ = [
    "loads",
    "prepare",
    "UnsafePickle",
    "ForbiddenGlobal",
    "Record",
    "SAFE_GLOBALS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_OPS",
]

logger = logging.getLogger("policylink.server")

#: Default byte budget of one load (the servers' default message limit, 64 MiB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Default element budget of the calls in one load.
DEFAULT_MAX_ELEMENTS = 1_000_000
#: Default opcode budget of one load (weighted, see the module docstring).
DEFAULT_MAX_OPS = 100_000

#: Dimensions of a numpy array or torch tensor (numpy allows 64).
MAX_NDIM = 32
#: Characters of text converted to a number (Python's own limit for decimal text).
MAX_NUMBER_TEXT = 4300
#: Characters of a dtype, device or enum name passed to a call.
_MAX_NAME = 64
#: Leaves of a tuple used as a dict key or set element.
_MAX_KEY_LEAVES = 64

_CALL_OPS = 16  # weight of REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST, BUILD
_NUMBER_KEY_OPS = 2  # weight of a number (or tuple) used as a key: its hash is predictable, so it is tracked
_MAX_EQUAL_HASHES = 16  # distinct numeric keys of one container that may share a hash value
_STORAGE_OPS = 256  # weight of rebuilding one torch storage (plus its five pickles)

_TEXT_ENCODINGS = frozenset({"utf-8", "utf8", "UTF-8", "latin-1", "latin1", "iso-8859-1", "ascii", "ASCII"})
_TEXT_ERRORS = frozenset({"strict", "replace", "ignore", "surrogateescape", "surrogatepass"})

_NPY_REFCOUNT_OR_POINTER = 0x01 | 0x04  # numpy dtype flags NPY_ITEM_REFCOUNT (== HASOBJECT), NPY_ITEM_IS_POINTER
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_TORCH_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


class UnsafePickle(ProtocolError):
    """The payload names a global the restricted unpickler does not admit, or exceeds a limit."""


class ForbiddenGlobal(UnsafePickle):
    """The payload names a global (``module.name``) that is not admitted."""

    def __init__(self, message: str, module: str, name: str) -> None:
        super().__init__(message)
        self.module, self.name = module, name


#: ``(module, name)`` pairs a payload may name. Each is data-only: building it runs no user code.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "complex", "bool", "slice", "range", "object")]
    + [("collections", "OrderedDict"), ("collections", "defaultdict"), ("copyreg", "_reconstructor")]
    # numpy arrays, scalars and dtypes (numpy 1 and 2 module names)
    + [(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("numpy.dtypes", name) for name in ("Float32DType", "Float64DType", "Float16DType", "UInt8DType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt16DType", "BoolDType", "StrDType")]
    # torch tensors (storages are rebuilt by _load_storage below)
    + [("torch._utils", name) for name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter")]
    + [("torch", "Size"), ("torch", "device"), ("torch", "float32"), ("torch", "float64"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "uint8"), ("torch", "int64"), ("torch", "int32"), ("torch", "bool")]
    + [("torch", name) for name in ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "ByteStorage", "LongStorage", "IntStorage", "BoolStorage")]
    # LeRobot 0.4.4's async-inference messages
    + [("lerobot.async_inference.helpers", name) for name in ("TimedObservation", "TimedAction", "RemotePolicyConfig", "TimedData")]
    + [("lerobot.configs.types", name) for name in ("PolicyFeature", "FeatureType", "NormalizationMode")]
)

_LOAD_FROM_BYTES = ("torch.storage", "_load_from_bytes")


class Record:
    """A legacy client's object, rebuilt as a bag of attributes (its class is never imported)."""

    _class_name = "Record"

    def __repr__(self) -> str:
        return f"<{self._class_name} {sorted(vars(self))}>"

    def __reduce__(self) -> Any:  # a reply never pickles a Record back as a foreign class
        return (dict, (vars(self),))


def _record_class(module: str, name: str) -> type[Record]:
    return type(name, (Record,), {"_class_name": f"{module}.{name}", "__module__": __name__})


# --------------------------------------------------------------------------- budget


class _Budget:
    """What one :func:`loads` may still spend; shared by the nested torch-storage pickles."""

    __slots__ = ("ops_left", "max_ops", "bytes_used", "max_bytes", "elements_used", "max_elements")

    def __init__(self, max_ops: int, max_bytes: int, max_elements: int) -> None:
        self.ops_left = self.max_ops = max_ops
        self.bytes_used, self.max_bytes = 0, max_bytes
        self.elements_used, self.max_elements = 0, max_elements

    def ops(self, n: int) -> None:
        self.ops_left -= n
        if self.ops_left < 0:
            raise UnsafePickle(f"refusing a pickle that takes more than {self.max_ops} opcodes to build (limit max_ops={self.max_ops})")

    def elements(self, what: str, n: int) -> None:
        used = self.elements_used + n
        if used > self.max_elements:
            already = f" after {self.elements_used} already built" if self.elements_used else ""
            raise UnsafePickle(f"refusing {what} of {n} elements{already} (limit max_elements={self.max_elements})")
        self.elements_used = used

    def bytes(self, what: str, n: int) -> None:
        used = self.bytes_used + n
        if used > self.max_bytes:
            already = f" after {self.bytes_used} already built" if self.bytes_used else ""
            raise UnsafePickle(f"refusing {what} of {n} bytes{already} (limit max_bytes={self.max_bytes})")
        self.bytes_used = used


# --------------------------------------------------------------------------- argument checks
#
# A check gets (unpickler, name, args, kwargs), raises UnsafePickle, and
# returns the (args, kwargs) to call with. It runs before the call.


def _describe(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    return f"a {type(obj).__name__}"


def _arity(name: str, args: tuple, kwargs: dict, most: int, least: int = 0, keywords: bool = False) -> None:
    if not least <= len(args) <= most:
        raise UnsafePickle(f"refusing {name} with {len(args)} arguments (expected {least} to {most})")
    if kwargs and not keywords:
        raise UnsafePickle(f"refusing keyword arguments to {name}")


def _is_int(x: Any) -> bool:
    return (type(x) is int or isinstance(x, np.integer)) and type(x) is not bool


def _range_len(r: range) -> int:
    try:
        return len(r)
    except OverflowError:  # more than sys.maxsize elements
        return (abs(r.stop - r.start) + abs(r.step) - 1) // abs(r.step)


_SIZED = (list, tuple, dict, set, frozenset, str, bytes, bytearray)


def _elements_of(name: str, x: Any) -> int:
    """Elements a call would take from ``x``; refuses anything but builtin containers, text and ranges."""
    if type(x) is range:
        return _range_len(x)
    if isinstance(x, _SIZED):
        return len(x)
    raise UnsafePickle(f"refusing {name} of {_describe(x)}: only builtin containers, strings, bytes and ranges are converted")


def _new_element_bytes(x: Any, n: int) -> int:
    # Iterating a range makes int objects, a string one-character strings.
    if type(x) is range:
        return 32 * n
    if isinstance(x, str):
        return 64 * n
    return 0


def _check_sequence(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 1)
    if args:
        n = _elements_of(name, args[0])
        u.budget.elements(name, n)
        u.budget.bytes(name, 64 + 8 * n + _new_element_bytes(args[0], n))
    return args, kwargs


def _check_set(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 1)
    if args:
        source = args[0]
        n = _elements_of(name, source)
        u.budget.elements(name, n)
        u.budget.bytes(name, 256 + 64 * n + _new_element_bytes(source, n))
        if type(source) is range:
            # Distinct 64-bit ints in arithmetic progression: at most 9 share a hash value.
            if n and not (_small_int(source[0]) and _small_int(source[-1])):
                raise UnsafePickle(f"refusing {name} of a range past 64 bits: such numbers hash slowly")
            u.budget.ops(n // 8)
        elif isinstance(source, (dict, set, frozenset)):
            u.budget.ops(n // 8)  # keys already checked when that container was built
        elif not isinstance(source, (str, bytes, bytearray)):
            u.add_keys(None, source)
    return args, kwargs


def _check_mapping_arg(u: _RestrictedUnpickler, name: str, source: Any) -> None:
    if isinstance(source, dict):
        n = len(source)
        u.budget.elements(name, n)
        u.budget.ops(n // 8)  # keys already checked when that dict was built
    elif type(source) in (list, tuple):
        n = len(source)
        u.budget.elements(name, n)
        for pair in source:
            if type(pair) not in (tuple, list) or len(pair) != 2:
                raise UnsafePickle(f"refusing {name} of a sequence whose items are not (key, value) pairs")
        u.add_keys(None, (pair[0] for pair in source))
    else:
        raise UnsafePickle(f"refusing {name} of {_describe(source)}: only a dict or a list of pairs is converted")
    u.budget.bytes(name, 256 + 104 * n)


def _check_dict(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 1, keywords=True)
    if args:
        _check_mapping_arg(u, name, args[0])
    if kwargs:
        u.budget.elements(name, len(kwargs))
    return args, kwargs


_DEFAULT_FACTORIES = (None, list, dict, set, tuple, frozenset, int, float, str, bytes, bytearray, OrderedDict, object)


def _check_defaultdict(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 2)
    if args:
        if not any(args[0] is factory for factory in _DEFAULT_FACTORIES):
            raise UnsafePickle(f"refusing {name} with default factory {_describe(args[0])}: only builtin containers and numbers are admitted")
        if len(args) == 2:
            _check_mapping_arg(u, name, args[1])
    return args, kwargs


def _check_number_text(u: _RestrictedUnpickler, name: str, x: Any) -> None:
    if isinstance(x, (str, bytes, bytearray)):
        if len(x) > MAX_NUMBER_TEXT:
            raise UnsafePickle(f"refusing {name} of a {len(x)}-character string (limit {MAX_NUMBER_TEXT} digits)")
        u.budget.elements(name, len(x))
    elif not isinstance(x, (int, float, complex, np.number, np.bool_)):
        raise UnsafePickle(f"refusing {name} of {_describe(x)}: only numbers and text are converted")


def _check_int(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 2)
    if args:
        _check_number_text(u, name, args[0])
    if len(args) == 2 and not _is_int(args[1]):
        raise UnsafePickle(f"refusing {name} with a base of {_describe(args[1])}")
    return args, kwargs


def _check_float(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 2 if name == "builtins.complex" else 1)
    for x in args:
        _check_number_text(u, name, x)
    return args, kwargs


def _check_text_codec(name: str, args: tuple) -> None:
    if not isinstance(args[1], str) or args[1] not in _TEXT_ENCODINGS:
        raise UnsafePickle(f"refusing {name} with encoding {args[1]!r}: only UTF-8, Latin-1 and ASCII are admitted")
    if len(args) == 3 and (not isinstance(args[2], str) or args[2] not in _TEXT_ERRORS):
        raise UnsafePickle(f"refusing {name} with error handler {args[2]!r}")


def _check_str(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 3)
    if not args:
        return args, kwargs
    x = args[0]
    if len(args) == 1:
        if type(x) is int:
            digits = int(x.bit_length() * 0.30103) + 1
            if digits > MAX_NUMBER_TEXT:
                raise UnsafePickle(f"refusing {name} of an int of about {digits} digits (limit {MAX_NUMBER_TEXT} digits)")
            u.budget.elements(name, digits)
        elif not (isinstance(x, (str, float, complex, bool, np.number, np.bool_)) or x is None):
            # str() of a container or of bytes is its repr: up to 4x its size, recursive.
            raise UnsafePickle(f"refusing {name} of {_describe(x)}: only text and numbers are converted")
        return args, kwargs
    if not isinstance(x, (bytes, bytearray)):
        raise UnsafePickle(f"refusing {name} decoding {_describe(x)}")
    _check_text_codec(name, args)
    u.budget.bytes(name, 64 + 4 * len(x))  # one astral character makes every character 4 bytes
    return args, kwargs


def _check_bytes(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 3)
    if not args:
        return args, kwargs
    x = args[0]
    if len(args) > 1:
        if not isinstance(x, str):
            raise UnsafePickle(f"refusing {name} encoding {_describe(x)}")
        _check_text_codec(name, args)
        u.budget.bytes(name, 64 + 4 * len(x))
    elif _is_int(x):
        u.budget.bytes(name, max(0, int(x)))
    elif isinstance(x, (bytes, bytearray)):
        u.budget.bytes(name, len(x))
    elif type(x) in (list, tuple, range):
        n = _elements_of(name, x)
        u.budget.elements(name, n)
        u.budget.bytes(name, n)
    else:
        raise UnsafePickle(f"refusing {name} of {_describe(x)}: only sizes, bytes and lists of ints are converted")
    return args, kwargs


def _check_any(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 1)
    return args, kwargs


def _check_slice(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 3, 1)
    return args, kwargs


def _check_range(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 3, 1)
    if not all(_is_int(x) for x in args):
        raise UnsafePickle(f"refusing {name} of non-integers")
    return args, kwargs


def _check_no_args(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 0)
    return args, kwargs


def _check_fields(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # A dataclass __init__ only stores its arguments.
    _arity(name, args, kwargs, 16, keywords=True)
    if len(kwargs) > 16:
        raise UnsafePickle(f"refusing {name} with {len(kwargs)} keyword arguments")
    return args, kwargs


def _check_enum(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 1, 1)
    value = args[0]
    if not ((isinstance(value, str) and len(value) <= _MAX_NAME) or isinstance(value, enum.Enum)):
        # The value is hashed to find the member: it must hash in bounded time.
        raise UnsafePickle(f"refusing {name} of {_describe(value)}: enum values are short strings")
    return args, kwargs


def _refuse_call(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    raise UnsafePickle(f"refusing to call {name}: it is admitted as a value, not as a callable")


def _check_reconstructor(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # copyreg._reconstructor(cls, base, state) is base.__new__(cls, state) then base.__init__(obj, state).
    _arity(name, args, kwargs, 3, 3)
    cls, base, state = args
    if not isinstance(cls, type) or not isinstance(base, type) or not issubclass(cls, base):
        raise UnsafePickle(f"refusing {name} of {_describe(cls)} on {_describe(base)}")
    cls_spec = u.spec_of(cls)
    if cls_spec is None:
        raise UnsafePickle(f"refusing {name} of {_describe(cls)}: not an admitted class")
    if base is not object:
        base_spec = u.spec_of(base)
        if base_spec is None:
            raise UnsafePickle(f"refusing {name} on {_describe(base)}: not an admitted class")
        base_spec.check(u, f"{name} on {base_spec.name}", (state,), {})
    return args, kwargs


# numpy ---------------------------------------------------------------------


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if _is_int(shape):
        shape = (shape,)
    if type(shape) is not tuple or not all(_is_int(d) for d in shape):
        raise UnsafePickle(f"refusing {name} with shape {_describe(shape)}: a shape is a tuple of ints")
    if len(shape) > MAX_NDIM:
        raise UnsafePickle(f"refusing {name} of {len(shape)} dimensions (limit {MAX_NDIM})")
    if any(d < 0 for d in shape):
        raise UnsafePickle(f"refusing {name} with negative shape {shape}")
    return tuple(int(d) for d in shape)


def _short_name(name: str, what: str, x: Any) -> None:
    if not isinstance(x, (str, bytes)) or len(x) > _MAX_NAME:
        raise UnsafePickle(f"refusing {name} with {what} {_describe(x) if not isinstance(x, (str, bytes)) else repr(x[:80])}")


def _plain_object_dtype(dtype: np.dtype) -> bool:
    return dtype.type is np.object_


def _check_safe_dtype(name: str, dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise UnsafePickle(f"refusing {name} with dtype {_describe(dtype)}")
    if dtype.hasobject and not _plain_object_dtype(dtype):
        raise UnsafePickle(f"refusing {name} of dtype {dtype}: structured dtypes with object fields are not admitted")
    return dtype


def _check_np_reconstruct(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # numpy's _reconstruct(ndarray, shape, typecode) allocates an empty array of that shape.
    _arity(name, args, kwargs, 3, 3)
    subtype, shape, code = args
    if subtype is not np.ndarray:
        raise UnsafePickle(f"refusing {name} of {_describe(subtype)}: only numpy.ndarray is admitted")
    shape = _shape(name, shape)
    if isinstance(code, np.dtype):
        itemsize = _check_safe_dtype(name, code).itemsize
    else:
        _short_name(name, "typecode", code)
        itemsize = _check_safe_dtype(name, np.dtype(code)).itemsize
    u.budget.bytes(name, math.prod(shape) * itemsize)
    return args, kwargs


def _check_np_scalar(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 2, 1)
    dtype = _check_safe_dtype(name, args[0])
    if _plain_object_dtype(dtype):
        return args, kwargs  # scalar(dtype('O'), obj) is obj
    u.budget.bytes(name, dtype.itemsize)
    if len(args) == 2 and not (isinstance(args[1], (bytes, bytearray)) and len(args[1]) == dtype.itemsize):
        raise UnsafePickle(f"refusing {name} of dtype {dtype}: its data must be {dtype.itemsize} bytes, got {_describe(args[1])}")
    return args, kwargs


def _check_np_dtype(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # numpy.dtype(obj, align, copy): always copy, or a later BUILD would rewrite numpy's shared dtype.
    _arity(name, args, kwargs, 3, 1)
    obj = args[0]
    if not isinstance(obj, np.dtype):
        _short_name(name, "type string", obj)
    align = bool(args[1]) if len(args) > 1 and isinstance(args[1], (bool, int)) else False
    dtype = np.dtype(obj, align, True)
    _check_safe_dtype(name, dtype)
    return (dtype, align, True), {}


def _check_array_state(u: _RestrictedUnpickler, array: np.ndarray, state: Any) -> None:
    """Checks ``ndarray.__setstate__((version,) shape, dtype, is_fortran, rawdata)``."""
    name = "numpy.ndarray.__setstate__"
    if type(state) is not tuple or len(state) not in (4, 5):
        raise UnsafePickle(f"refusing {name} with a malformed state")
    shape, dtype, is_fortran, rawdata = state[-4:]
    shape = _shape(name, shape)
    dtype = _check_safe_dtype(name, dtype)
    if not isinstance(is_fortran, (bool, int)):
        raise UnsafePickle(f"refusing {name} with a malformed state")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    u.budget.bytes(name, nbytes)
    if _plain_object_dtype(dtype):
        if type(rawdata) is not list or len(rawdata) != count:
            raise UnsafePickle(f"refusing {name}: an object array of shape {shape} needs a list of {count} items, got {_describe(rawdata)}")
        u.budget.elements(name, count)
    elif not isinstance(rawdata, (bytes, bytearray, str)) or len(rawdata) != nbytes:
        got = f"{len(rawdata)} bytes" if isinstance(rawdata, (bytes, bytearray, str)) else _describe(rawdata)
        raise UnsafePickle(f"refusing {name}: an array of shape {shape} and dtype {dtype} needs {nbytes} bytes, got {got}")


def _check_dtype_state(u: _RestrictedUnpickler, dtype: np.dtype, state: Any) -> None:
    """Checks ``dtype.__setstate__``: fields inside the item, no object/pointer flags."""
    name = "numpy.dtype.__setstate__"
    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise UnsafePickle(f"refusing {name} with a state numpy >= 1.7 does not write")
    _, endian, subarray, names, fields, elsize, alignment, flags = state[:8]
    if not (isinstance(endian, str) and endian in "<>|=" and len(endian) == 1):
        raise UnsafePickle(f"refusing {name} with byte order {endian!r}")
    if not (_is_int(elsize) and _is_int(alignment) and _is_int(flags)):
        raise UnsafePickle(f"refusing {name} with a malformed state")
    if elsize not in (-1, dtype.itemsize):
        raise UnsafePickle(f"refusing {name} that resizes a {dtype.itemsize}-byte item to {elsize} bytes")
    if not (alignment == -1 or alignment in (1, 2, 4, 8, 16, 32, 64)):
        raise UnsafePickle(f"refusing {name} with alignment {alignment}")
    structured = subarray is not None or names is not None or fields is not None
    if structured and dtype.kind != "V":
        raise UnsafePickle(f"refusing {name} that gives fields to a {dtype} dtype")
    if not structured and flags != dtype.flags:
        raise UnsafePickle(f"refusing {name} that changes a {dtype} dtype's flags from {dtype.flags} to {flags}")
    if structured and (flags & _NPY_REFCOUNT_OR_POINTER or not 0 <= flags <= 0xFF):
        raise UnsafePickle(f"refusing {name} with flags {flags}: object and pointer items are not admitted")
    if subarray is not None:
        if type(subarray) is not tuple or len(subarray) != 2:
            raise UnsafePickle(f"refusing {name} with a malformed subarray")
        base = _check_safe_dtype(name, subarray[0])
        if base.hasobject:
            raise UnsafePickle(f"refusing {name} with an object subarray")
        if base.itemsize * math.prod(_shape(name, subarray[1])) != dtype.itemsize:
            raise UnsafePickle(f"refusing {name}: its subarray does not fill the {dtype.itemsize}-byte item")
    if (names is None) != (fields is None):
        raise UnsafePickle(f"refusing {name} with inconsistent names and fields")
    if names is not None:
        if type(names) is not tuple or not all(type(n) is str for n in names) or type(fields) is not dict or len(fields) != len(names):
            raise UnsafePickle(f"refusing {name} with malformed fields")
        u.budget.elements(name, len(names))
        for key in names:
            field = fields.get(key)
            if type(field) is not tuple or len(field) not in (2, 3) or not _is_int(field[1]):
                raise UnsafePickle(f"refusing {name} with a malformed field {key!r}")
            field_dtype, offset = _check_safe_dtype(name, field[0]), field[1]
            if field_dtype.hasobject:
                raise UnsafePickle(f"refusing {name} with an object field {key!r}")
            if offset < 0 or offset + field_dtype.itemsize > dtype.itemsize:
                raise UnsafePickle(f"refusing {name}: field {key!r} at offset {offset} overruns the {dtype.itemsize}-byte item")
    if len(state) == 9:
        metadata = state[8]
        if not (metadata is None or type(metadata) is dict or (type(metadata) is tuple and len(metadata) == 2 and type(metadata[0]) is dict and dtype.kind in "mM")):
            raise UnsafePickle(f"refusing {name} with metadata {_describe(metadata)}")


# torch ---------------------------------------------------------------------


def _torch_itemsize(dtype: Any) -> int:
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize is None:  # torch < 2.1
        itemsize = sys.modules["torch._utils"]._element_size(dtype)
    return int(itemsize)


def _check_tensor_layout(u: _RestrictedUnpickler, name: str, storage: Any, offset: Any, size: Any, stride: Any) -> None:
    torch = sys.modules["torch"]
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickle(f"refusing {name} of {_describe(storage)}: only a storage this pickle rebuilt is admitted")
    if not _is_int(offset) or offset < 0:
        raise UnsafePickle(f"refusing {name} with storage offset {offset!r}")
    size, stride = _shape(name, tuple(size) if isinstance(size, (tuple, list)) else size), _shape(name, tuple(stride) if isinstance(stride, (tuple, list)) else stride)
    if len(size) != len(stride):
        raise UnsafePickle(f"refusing {name} with {len(size)} sizes and {len(stride)} strides")
    itemsize = _torch_itemsize(storage.dtype)
    numel = math.prod(size)
    nbytes = numel * itemsize
    if nbytes > u.budget.max_bytes:
        raise UnsafePickle(f"refusing {name} of size {size}: {nbytes} bytes (limit max_bytes={u.budget.max_bytes})")
    storage_numel = storage._size()
    if numel:
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= storage_numel:
            raise UnsafePickle(f"refusing {name} of size {size} and stride {stride} at offset {offset}: it reaches element {last} of a storage of {storage_numel}")
    # A view with zero strides claims more than its storage; whoever reads it materializes that.
    excess = nbytes - storage_numel * itemsize
    if excess > 0:
        u.budget.bytes(name, excess)


def _empty_hooks(name: str, hooks: Any) -> None:
    if not (isinstance(hooks, dict) and not hooks):
        raise UnsafePickle(f"refusing {name} with backward hooks {_describe(hooks)}")


def _check_rebuild_tensor_v2(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    _arity(name, args, kwargs, 7, 6)
    _check_tensor_layout(u, name, *args[:4])
    if not isinstance(args[4], bool):
        raise UnsafePickle(f"refusing {name} with requires_grad {_describe(args[4])}")
    _empty_hooks(name, args[5])
    if len(args) == 7:
        metadata = args[6]
        if not (metadata is None or (type(metadata) is dict and len(metadata) <= 16 and all(type(k) is str and isinstance(v, (bool, int)) for k, v in metadata.items()))):
            raise UnsafePickle(f"refusing {name} with metadata {_describe(metadata)}")
    return args, kwargs


def _check_rebuild_tensor(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 4, 4)
    _check_tensor_layout(u, name, *args)
    return args, kwargs


def _check_rebuild_parameter(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 3, 3)
    if not isinstance(args[0], sys.modules["torch"].Tensor) or not isinstance(args[1], bool):
        raise UnsafePickle(f"refusing {name} of {_describe(args[0])}")
    _empty_hooks(name, args[2])
    return args, kwargs


def _check_torch_size(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 1)
    if args:
        if type(args[0]) not in (list, tuple):
            raise UnsafePickle(f"refusing {name} of {_describe(args[0])}")
        _shape(name, tuple(args[0]))
    return args, kwargs


def _check_torch_device(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _arity(name, args, kwargs, 2, 1)
    if not (_is_int(args[0]) or (isinstance(args[0], str) and len(args[0]) <= _MAX_NAME)):
        raise UnsafePickle(f"refusing {name} of {_describe(args[0])}")
    if len(args) == 2 and not (_is_int(args[1]) or args[1] is None):
        raise UnsafePickle(f"refusing {name} with index {_describe(args[1])}")
    return args, kwargs


class _StorageType:
    """A ``torch.<Kind>Storage`` named inside a storage stream: only its dtype matters."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype


class _StorageRef:
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: Any, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel


def _load_storage(u: _RestrictedUnpickler, name: str, args: tuple, kwargs: dict, new: bool) -> Any:
    """``torch.storage._load_from_bytes(b)``: rebuild one storage from ``torch.save``'s legacy stream.

    The stream is five pickles (magic number, protocol version, system info,
    the storage's persistent id, the list of storage keys), an int64 element
    count and the raw bytes. Torch would allocate the count the stream claims
    before reading the bytes, and restore the storage onto the device it
    names; here the count must match the bytes present, and the storage is
    always a CPU one.
    """
    _arity(name, args, kwargs, 1, 1)
    data = args[0]
    if type(data) not in (bytes, bytearray):
        raise UnsafePickle(f"refusing {name} of {_describe(data)}")
    if data[:4] == b"PK\x03\x04":
        raise UnsafePickle(f"refusing {name} of a zip archive: torch pickles storages in its legacy format")
    u.budget.ops(_STORAGE_OPS)
    stream = io.BytesIO(data)
    refs: dict[str, _StorageRef] = {}

    def part() -> Any:
        return _StorageStreamUnpickler(stream, u.budget, refs, len(data)).load()

    if part() != _TORCH_MAGIC or part() != _TORCH_PROTOCOL:
        raise ProtocolError(f"malformed pickle: {name}: not a torch storage stream")
    sys_info = part()
    if type(sys_info) is not dict or sys_info.get("little_endian") is not True:
        raise UnsafePickle(f"refusing {name}: only little-endian storages are admitted")
    root = part()
    keys = part()
    if not isinstance(root, _StorageRef) or keys != [root.key] or len(refs) != 1:
        raise UnsafePickle(f"refusing {name}: a storage stream must hold exactly one storage")
    header = stream.read(8)
    numel = int.from_bytes(header, "little", signed=True) if len(header) == 8 else -1
    if numel != root.numel:
        raise ProtocolError(f"malformed pickle: {name}: the storage claims {root.numel} elements, its data header {numel}")
    itemsize = _torch_itemsize(root.dtype)
    nbytes = numel * itemsize
    if nbytes > len(data) - stream.tell():
        raise UnsafePickle(f"refusing {name}: the storage claims {nbytes} bytes but only {len(data) - stream.tell()} follow")
    u.budget.bytes(name, nbytes)
    raw = stream.read(nbytes)
    torch = sys.modules["torch"]
    untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if nbytes else torch.UntypedStorage(0)
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=root.dtype, _internal=True)


def _load_from_bytes(data: bytes) -> Any:
    """Stands for ``torch.storage._load_from_bytes`` in the allow-list; :func:`loads` calls :func:`_load_storage` instead."""
    raise UnsafePickle("torch storages are only rebuilt inside safe_pickle.loads")


# --------------------------------------------------------------------------- admitted globals


class _Spec:
    """How one admitted global may be called."""

    __slots__ = ("obj", "name", "check", "invoke", "fresh")

    def __init__(self, obj: Any, name: str, check: Callable, invoke: Callable | None = None, fresh: bool = False) -> None:
        self.obj, self.name, self.check, self.invoke, self.fresh = obj, name, check, invoke, fresh


_BUILTIN_CHECKS: dict[str, Callable] = {
    "dict": _check_dict,
    "list": _check_sequence,
    "tuple": _check_sequence,
    "set": _check_set,
    "frozenset": _check_set,
    "str": _check_str,
    "bytes": _check_bytes,
    "bytearray": _check_bytes,
    "int": _check_int,
    "float": _check_float,
    "complex": _check_float,
    "bool": _check_any,
    "slice": _check_slice,
    "range": _check_range,
    "object": _check_no_args,
}

_lock = threading.RLock()
_prepared = False
#: ``(module, name)`` -> object, filled by :func:`prepare`; find_class reads only this.
_RESOLVED: dict[tuple[str, str], Any] = {}
#: ``id(object)`` -> its :class:`_Spec`, for every resolved global.
_SPECS: dict[int, _Spec] = {}
#: Classes whose fresh instances BUILD fills through their ``__dict__`` (LeRobot dataclasses).
_PLAIN_CLASSES: set[type] = set()
#: ``torch.<Kind>Storage`` name -> dtype, for storage streams.
_STORAGE_DTYPES: dict[str, Any] = {}


def _check_for(module: str, name: str, obj: Any) -> tuple[Callable, bool]:
    """The argument check for one admitted global, and whether its results are fresh objects BUILD may fill."""
    if module == "builtins":
        return _BUILTIN_CHECKS[name], False
    if module == "collections":
        return (_check_defaultdict if name == "defaultdict" else _check_dict), False
    if (module, name) == ("copyreg", "_reconstructor"):
        return _check_reconstructor, True
    if name == "_reconstruct":
        return _check_np_reconstruct, True
    if name == "scalar":
        return _check_np_scalar, False
    if (module, name) == ("numpy", "dtype"):
        return _check_np_dtype, True
    if module == "torch._utils":
        return {"_rebuild_tensor_v2": _check_rebuild_tensor_v2, "_rebuild_tensor": _check_rebuild_tensor, "_rebuild_parameter": _check_rebuild_parameter}[name], False
    if (module, name) == ("torch", "Size"):
        return _check_torch_size, False
    if (module, name) == ("torch", "device"):
        return _check_torch_device, False
    if module.startswith("lerobot.") and isinstance(obj, type):
        if issubclass(obj, enum.Enum):
            return _check_enum, False
        return _check_fields, True
    return _refuse_call, False  # numpy.ndarray, numpy DType classes, torch dtypes and storage classes


def prepare() -> None:
    """Import and resolve every global the allow-list names, once; call at server start-up.

    Imports numpy's modules, torch (``torch._utils``, ``torch.storage``) and
    LeRobot's async-inference modules when they are installed, so that no
    request ever triggers an import. Idempotent and thread-safe; then runs a
    few sample payloads through :func:`loads` so that any lazy import on that
    path happens now too.
    """
    global _prepared
    if _prepared:
        return
    with _lock:
        if _prepared:
            return
        resolved: dict[tuple[str, str], Any] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 2 warns on numpy.core.* attribute access
            for module in sorted({module for module, _ in SAFE_GLOBALS} | {"torch.storage"}):
                if module in sys.modules:
                    continue
                try:
                    importlib.import_module(module)
                except ImportError:
                    logger.debug("safe_pickle: %s is not installed; pickles naming it are refused", module)
                except Exception as exc:  # a broken optional install must not stop the server
                    logger.warning("safe_pickle: importing %s failed (%s: %s); pickles naming it are refused", module, type(exc).__name__, exc)
            for module, name in SAFE_GLOBALS:
                mod = sys.modules.get(module)
                if mod is not None and hasattr(mod, name):
                    resolved[(module, name)] = getattr(mod, name)
        codecs.lookup("raw-unicode-escape")  # protocol 0's UNICODE opcode decodes with it
        specs: dict[int, _Spec] = {}
        plain: set[type] = set()
        for (module, name), obj in resolved.items():
            check, fresh = _check_for(module, name, obj)
            specs[id(obj)] = _Spec(obj, f"{module}.{name}", check, fresh=fresh)
            if check is _check_fields:
                plain.add(obj)
        if "torch" in sys.modules and "torch.storage" in sys.modules:
            torch = sys.modules["torch"]
            resolved[_LOAD_FROM_BYTES] = _load_from_bytes
            specs[id(_load_from_bytes)] = _Spec(_load_from_bytes, "torch.storage._load_from_bytes", _refuse_call, invoke=_load_storage)
            for name in dir(torch):
                if name.endswith("Storage") and name not in ("TypedStorage", "UntypedStorage"):
                    try:
                        _STORAGE_DTYPES[name] = torch.storage._get_dtype_from_pickle_storage_type(name)
                    except Exception:  # noqa: BLE001 - names without a dtype are simply not admitted
                        pass
        _RESOLVED.update(resolved)
        _SPECS.update(specs)
        _PLAIN_CLASSES.update(plain)
        _prepared = True
    _warm_up()


def _warm_up() -> None:
    samples: list[Any] = [
        {"a": [1, 2.5, "x", b"y", None, True], "b": (1,), "c": {1, 2}, "d": frozenset({3})},
        OrderedDict(a=1),
        defaultdict(list, a=[1]),
        bytearray(b"ab"),
        np.zeros((2, 3), np.uint8),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "U2")]),
        np.array([1, "a"], dtype=object),
        np.float32(1.5),
        np.datetime64("2020-01-01"),
        "\u00e9",
    ]
    torch = sys.modules.get("torch")
    if torch is not None and _LOAD_FROM_BYTES in _RESOLVED:
        samples += [torch.zeros(2, 3), torch.nn.Parameter(torch.ones(2)), torch.Size([2])]
    try:
        for sample in samples:
            for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
                try:
                    payload = pickle.dumps(sample, protocol=protocol)
                except Exception:  # noqa: BLE001 - some samples do not pickle at some protocols
                    continue
                try:
                    loads(payload)
                except ProtocolError:
                    pass  # protocol 0/2 pickles of some types name globals that are not admitted
    except Exception:  # noqa: BLE001 - the warm-up is an optimisation only
        logger.warning("safe_pickle: warm-up failed", exc_info=True)


# --------------------------------------------------------------------------- keys


def _small_int(x: int) -> bool:
    return -(1 << 63) <= x < (1 << 64)


def _is_plain_key(item: Any) -> bool:
    # Hashed with a per-process secret (str, bytes), by identity (Record) or by name (enum members).
    return type(item) in (str, bytes) or item is None or type(item) is bool or isinstance(item, (enum.Enum, Record, np.str_, np.bytes_, np.bool_))


def _key_units(key: Any) -> int:
    """0 for a key whose hash cannot be predicted; else the opcode units it costs.

    Refuses keys that hash slowly: ints past 64 bits (hashing is linear in
    their size, and a range of multiples of 2**61-1 all share one hash),
    tuples of more than 64 leaves (tuples do not cache their hash, and a pickle
    can nest one shared tuple 60 levels deep: 2**60 steps), anything else.
    """
    if _is_plain_key(key):
        return 0
    t = type(key)
    if t is int:
        if not _small_int(key):
            raise UnsafePickle(f"refusing an int of {key.bit_length()} bits as a dict key or set element (limit 64 bits)")
        return _NUMBER_KEY_OPS
    if t is float or t is complex or isinstance(key, (np.integer, np.floating)):
        return _NUMBER_KEY_OPS
    if t is not tuple:
        raise UnsafePickle(f"refusing {_describe(key)} as a dict key or set element: keys are strings, bytes, numbers or small tuples of those")
    leaves, pending = 0, [key]
    while pending:
        for item in pending.pop():
            leaves += 1
            if leaves > _MAX_KEY_LEAVES:
                raise UnsafePickle(f"refusing a tuple of more than {_MAX_KEY_LEAVES} items as a dict key or set element")
            if type(item) is tuple:
                pending.append(item)
            elif not _is_plain_key(item):
                _key_units(item)  # numbers are fine as leaves; this refuses the rest
    return max(leaves, _NUMBER_KEY_OPS)


# --------------------------------------------------------------------------- the unpickler


def _op_weights() -> tuple[int, ...]:
    weights = [1] * 256
    for opcode, weight in ((pickle.EMPTY_SET, 4), (pickle.FROZENSET, 4), (pickle.EMPTY_DICT, 2), (pickle.DICT, 2)):
        weights[opcode[0]] = weight
    for opcode in (pickle.REDUCE, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST, pickle.BUILD):
        weights[opcode[0]] = _CALL_OPS
    return tuple(weights)


_OP_WEIGHTS = _op_weights()
_DICT_TYPES = (dict, OrderedDict, defaultdict)


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler with every opcode that calls, fills or allocates checked."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO, records: Iterable[str], budget: _Budget, payload_size: int) -> None:
        super().__init__(file)
        self.budget = budget
        self._payload_size = payload_size
        self._records = {tuple(spec.split(":", 1)): None for spec in records}
        self._record_specs: dict[int, _Spec] = {}
        self._record_types: dict[tuple[str, str], type[Record]] = {}
        self._fresh: dict[int, Any] = {}  # objects this pickle created that BUILD may fill (kept alive: ids stay unique)
        self._buckets: dict[int, tuple[Any, dict[int, list[Any]]]] = {}  # container id -> (container, hash -> its numeric keys)

    # -- main loop -----------------------------------------------------------

    def load(self) -> Any:
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch, weights, budget = self.read, self.dispatch, _OP_WEIGHTS, self.budget
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                code = key[0]
                budget.ops_left -= weights[code]
                if budget.ops_left < 0:
                    budget.ops(0)
                dispatch[code](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    # -- globals -------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._records:
            if (module, name) not in self._record_types:
                record = _record_class(module, name)
                self._record_types[(module, name)] = record
                self._record_specs[id(record)] = _Spec(record, f"{module}.{name}", _check_no_args, fresh=True)
            return self._record_types[(module, name)]
        if self.proto < 3 and self.fix_imports:  # Python 2 names (__builtin__.set, copy_reg._reconstructor)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in SAFE_GLOBALS and (module, name) != _LOAD_FROM_BYTES:
            raise ForbiddenGlobal(f"refusing to unpickle {module}.{name}: only numpy arrays, torch tensors, builtins and LeRobot's async-inference classes are admitted", module, name)
        try:
            return _RESOLVED[(module, name)]
        except KeyError:
            raise UnsafePickle(f"refusing to unpickle {module}.{name}: this server lacks it ({module} is not installed, or was not importable when safe_pickle.prepare() ran)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("refusing a pickle with persistent ids")

    def spec_of(self, obj: Any) -> _Spec | None:
        spec = _SPECS.get(id(obj)) or self._record_specs.get(id(obj))
        return spec if spec is not None and spec.obj is obj else None

    # -- calls ---------------------------------------------------------------

    def _invoke(self, func: Any, args: Any, kwargs: Any, new: bool) -> Any:
        spec = self.spec_of(func)
        if spec is None:
            raise UnsafePickle(f"refusing to call {_describe(func)}: only the admitted classes and functions are called")
        if type(args) is not tuple:  # func(*range(10**9)) would expand any iterable
            raise UnsafePickle(f"refusing a call to {spec.name} whose arguments are {_describe(args)}, not a tuple")
        if kwargs is None:
            kwargs = {}
        elif type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise UnsafePickle(f"refusing a call to {spec.name} with keyword arguments {_describe(kwargs)}")
        if spec.invoke is not None:
            return spec.invoke(self, spec.name, args, kwargs, new)
        args, kwargs = spec.check(self, spec.name, args, kwargs)
        result = func.__new__(func, *args, **kwargs) if new else func(*args, **kwargs)
        if spec.fresh and (type(result) in _PLAIN_CLASSES or type(result) is np.ndarray or isinstance(result, (np.dtype, Record))):
            self._fresh[id(result)] = result
        return result

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        stack[-1] = self._invoke(stack[-1], args, None, new=False)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._invoke(cls, args, None, new=True))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._invoke(cls, args, kwargs, new=True))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list) -> None:
        if args or not isinstance(klass, type) or hasattr(klass, "__getinitargs__"):
            self.append(self._invoke(klass, tuple(args), None, new=False))
        else:
            self.append(self._invoke(klass, (), None, new=True))

    # -- filling objects -----------------------------------------------------

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if self._fresh.get(id(inst)) is not inst:
            raise UnsafePickle(f"refusing to fill in {_describe(inst)}: BUILD only fills objects this pickle created")
        if type(inst) is np.ndarray:
            _check_array_state(self, inst, state)
            np.ndarray.__setstate__(inst, state)
        elif isinstance(inst, np.dtype):
            _check_dtype_state(self, inst, state)
            inst.__setstate__(state)
            if inst.hasobject and not _plain_object_dtype(inst):
                raise UnsafePickle("refusing numpy.dtype.__setstate__ that made an object dtype")
        else:  # a LeRobot dataclass or a Record: set attributes, as pickle does without __setstate__
            slots = None
            if type(state) is tuple and len(state) == 2:
                state, slots = state
            for attributes in (state, slots):
                if not attributes:
                    continue
                if type(attributes) is not dict:
                    raise UnsafePickle(f"refusing to fill in {_describe(inst)} from {_describe(attributes)}")
                self.budget.elements("BUILD", len(attributes))
                for key, value in attributes.items():
                    if type(key) is not str or (key.startswith("__") and key.endswith("__")):
                        raise UnsafePickle(f"refusing to set attribute {key!r} of {_describe(inst)}")
                    inst.__dict__[sys.intern(key)] = value

    dispatch[pickle.BUILD[0]] = load_build

    def add_keys(self, container: Any, keys: Iterable[Any]) -> None:
        """Checks keys about to enter ``container`` (None: a container not built yet).

        Numbers (and tuples of them) hash predictably: distinct keys of one
        hash value make every insertion compare with all of them, so 100k
        crafted ints take a set minutes. Past _MAX_EQUAL_HASHES such keys of
        one hash value in one container, the payload is refused.
        """
        buckets: dict[int, list[Any]] | None = None
        units = 0
        for key in keys:
            if type(key) is str:
                continue
            cost = _key_units(key)
            if not cost:
                continue
            units += cost
            if buckets is None:
                buckets = self._buckets_of(container)
            bucket = buckets.setdefault(hash(key), [])
            if not any(other is key or other == key for other in bucket):
                bucket.append(key)
                if len(bucket) > _MAX_EQUAL_HASHES:
                    raise UnsafePickle(f"refusing a dict or set with more than {_MAX_EQUAL_HASHES} distinct keys of one hash value (a hash-flooding payload)")
        if units:
            self.budget.ops(units)

    def _buckets_of(self, container: Any) -> dict[int, list[Any]]:
        if container is None:
            return {}
        entry = self._buckets.get(id(container))
        if entry is not None and entry[0] is container:
            return entry[1]
        buckets: dict[int, list[Any]] = {}
        self.budget.ops(len(container))  # first numeric key into a container built by a call: index its keys once
        for key in container:
            if not _is_plain_key(key):
                buckets.setdefault(hash(key), []).append(key)
        self._buckets[id(container)] = (container, buckets)
        return buckets

    def load_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("DICT with an odd number of items")
        self.add_keys(None, items[0::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    dispatch[pickle.DICT[0]] = load_dict

    def _target(self, kinds: tuple[type, ...], opcode: str) -> Any:
        target = self.stack[-1]
        if type(target) not in kinds:
            raise UnsafePickle(f"refusing {opcode} on {_describe(target)}")
        return target

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self._target(_DICT_TYPES, "SETITEM")
        self.add_keys(target, (key,))
        target[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(_DICT_TYPES, "SETITEMS")
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with an odd number of items")
        self.add_keys(target, items[0::2])
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        self.add_keys(None, items)
        self.append(frozenset(items))

    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target((set,), "ADDITEMS")
        self.add_keys(target, items)
        target.update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_bytearray8(self) -> None:
        # pickle allocates the claimed length before reading: cap it by the payload.
        (size,) = pickle.unpack("<Q", self.read(8))  # type: ignore[attr-defined]
        if size > self._payload_size:
            raise UnsafePickle(f"refusing a BYTEARRAY8 of {size} bytes in a payload of {self._payload_size}")
        buffer = bytearray(size)
        self.readinto(buffer)
        self.append(buffer)

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


class _StorageStreamUnpickler(_RestrictedUnpickler):
    """The small pickles of a torch storage stream: only ``torch.<Kind>Storage`` names, one storage id."""

    dispatch = _RestrictedUnpickler.dispatch

    def __init__(self, file: io.BytesIO, budget: _Budget, refs: dict[str, _StorageRef], payload_size: int) -> None:
        super().__init__(file, (), budget, payload_size)
        self._refs = refs

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafePickle(f"refusing to unpickle {module}.{name} inside a torch storage: only storage types are admitted")

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel, view_metadata); the location is ignored (always CPU).
        if type(pid) is not tuple or len(pid) != 6 or pid[0] != "storage":
            raise UnsafePickle(f"refusing persistent id {_describe(pid)} inside a torch storage")
        _, storage_type, key, location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or type(key) is not str or not isinstance(location, str) or not _is_int(numel) or numel < 0 or view is not None:
            raise UnsafePickle("refusing a malformed or view storage id inside a torch storage")
        ref = self._refs.setdefault(key, _StorageRef(storage_type.dtype, key, int(numel)))
        if ref.numel != numel or ref.dtype != storage_type.dtype:
            raise UnsafePickle("refusing a torch storage stream that describes one storage twice")
        return ref


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a load runs (and restore it after the last one).

    Every opcode that makes a list, dict or set adds an object the collector
    tracks; with 100_000 of them alive the collector's passes made a MARK
    bomb take 0.4 s instead of 0.04 s. A load is bounded, so is the garbage it
    leaves for the collector to find once it runs again.
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


def loads(
    data: bytes,
    records: Iterable[str] = (),
    check: Callable[[Any], None] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_ops: int = DEFAULT_MAX_OPS,
) -> Any:
    """Unpickle ``data`` admitting only :data:`SAFE_GLOBALS` (and ``records``), within limits.

    ``max_bytes`` bounds what the pickle's calls allocate (never below twice
    ``len(data)``), ``max_elements`` the elements its calls build or consume,
    ``max_ops`` the opcodes it runs (see the module docstring for what each
    counts). ``check`` is called on the result.

    Raises :class:`UnsafePickle` for a forbidden global or a payload past a
    limit, and :class:`~policylink.errors.ProtocolError` for a malformed
    pickle.
    """
    for name, value in (("max_bytes", max_bytes), ("max_elements", max_elements), ("max_ops", max_ops)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not _prepared:
        logger.info("safe_pickle: prepare() was not called at start-up; importing the allow-list's modules now")
        prepare()
    try:
        size = memoryview(data).nbytes
        budget = _Budget(max_ops, max(max_bytes, 2 * size), max_elements)
        with _gc_paused():
            value = _RestrictedUnpickler(io.BytesIO(data), records, budget, size).load()
    except ProtocolError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many kinds
        raise ProtocolError(f"malformed pickle: {type(exc).__name__}: {exc}") from None
    if check is not None:
        check(value)
    return value
