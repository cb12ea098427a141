"""msgpack encoding of observations and replies, byte-compatible with openpi.

numpy arrays travel as a map ``{"__ndarray__": True, "data": <raw bytes>,
"dtype": <dtype.str>, "shape": [...]}`` and numpy scalars as
``{"__npgeneric__": True, "data": <python value>, "dtype": <dtype.str>}``
(keys are msgpack *bin* strings, as openpi-client writes them). Object, void
and complex arrays are refused: they cannot be rebuilt safely from bytes.

Decoding wraps the received buffer with ``np.frombuffer`` instead of copying
it, so an image arrives as a read-only view onto the message. Callers that
need to write into an array must copy it.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError

__all__ = ["packb", "unpackb", "Packer", "DEFAULT_MAX_MESSAGE_BYTES"]

#: Default largest message the server and client accept (bytes).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_NDARRAY = b"__ndarray__"
_NPGENERIC = b"__npgeneric__"
_REFUSED_KINDS = {"O": "object", "V": "void (structured)", "c": "complex"}


def _encode_numpy(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        kind = obj.dtype.kind
        if kind in _REFUSED_KINDS:
            raise ProtocolError(f"cannot send a numpy {_REFUSED_KINDS[kind]} array (dtype {obj.dtype}); use numeric arrays")
    if isinstance(obj, np.ndarray):
        # tobytes() copies into C order; a C-contiguous array could be sent as a
        # memoryview but msgpack needs a bytes-like object that outlives the call.
        return {_NDARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {_NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise ProtocolError(f"cannot encode a value of type {type(obj).__name__}")


def _decode_numpy(obj: dict) -> Any:
    if _NDARRAY in obj:
        return _decode_array(obj)
    if _NPGENERIC in obj:
        try:
            return np.dtype(obj[b"dtype"]).type(obj[b"data"])
        except (TypeError, ValueError, KeyError) as exc:
            raise ProtocolError(f"malformed numpy scalar: {exc}") from None
    return obj


def _decode_array(obj: dict) -> np.ndarray:
    try:
        dtype = np.dtype(obj[b"dtype"])
        shape = tuple(int(n) for n in obj[b"shape"])
        data = obj[b"data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed numpy array: {exc!r}") from None
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise ProtocolError(f"refusing numpy array of dtype {dtype}: {_REFUSED_KINDS.get(dtype.kind, 'object')} arrays are not accepted")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed numpy array: 'data' is not bytes")
    expected = dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise ProtocolError(f"numpy array data is {len(data)} bytes, but shape {shape} and dtype {dtype} need {expected}")
    # frombuffer shares memory with the message: no copy of large images.
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class Packer:
    """A reusable encoder (one per connection; not thread-safe)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=_encode_numpy)

    def pack(self, obj: Any) -> bytes:
        try:
            return self._packer.pack(obj)
        except ProtocolError:
            self._packer.reset()
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            raise ProtocolError(f"cannot encode message: {exc}") from None


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (nested dicts / lists of numpy arrays, str, numbers)."""
    return Packer().pack(obj)


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode a message; raises :class:`ProtocolError` when it is not valid msgpack."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_numpy, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise ProtocolError(f"message is not valid msgpack: {exc}") from None
