"""msgpack encoding of observations and replies, byte-compatible with openpi.

numpy arrays travel as a map ``{"__ndarray__": True, "data": <raw bytes>,
"dtype": <dtype.str>, "shape": [...]}`` and numpy scalars as
``{"__npgeneric__": True, "data": <python value>, "dtype": <dtype.str>}``
(keys are msgpack *bin* strings, as openpi-client writes them). Object, void
and complex arrays are refused: they cannot be rebuilt safely from bytes.

A camera frame the client compressed (:class:`CompressedImage`) travels as
``{"__image__": True, "format": "jpeg", "data": <bytes>, "shape": [H, W, 3]}``.
This module only checks that map (format, shape, pixel limit); the pixels are
decoded by :func:`policylink.compression.decompress_images`.

Decoding wraps the received buffer with ``np.frombuffer`` instead of copying
it, so an image arrives as a read-only view onto the message. Callers that
need to write into an array must copy it.

Decoding is bounded by a :class:`~policylink.limits.DecodeLimits`: before
msgpack builds anything, one pass over the message's headers (it skips over
strings and binary data by their length) counts the values each container
announces, follows the nesting and checks string lengths, and stops at the
first value past a limit. msgpack then decodes with per-container limits as a
second line of defence, and each numpy array header is checked (number of
dimensions, each dimension, size against the data) before it is wrapped.
Every refusal is a :class:`ProtocolError` naming the limit.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError
from .limits import DEFAULT_LIMITS, MAX_DIMENSION, DecodeLimits

__all__ = ["packb", "unpackb", "quick_unpackb", "Packer", "CompressedImage", "IMAGE_FORMATS", "DEFAULT_MAX_MESSAGE_BYTES"]

#: Default largest message the server and client accept (bytes).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: :func:`quick_unpackb` decodes messages up to this size (bytes) and this many values.
QUICK_MAX_BYTES = 4 * 1024 * 1024
QUICK_MAX_VALUES = 256

_NDARRAY = b"__ndarray__"
_NPGENERIC = b"__npgeneric__"
_IMAGE = b"__image__"
#: Compressed image formats a message may carry.
IMAGE_FORMATS = ("jpeg", "png")
_REFUSED_KINDS = {"O": "object", "V": "void (structured)", "c": "complex"}
_SCALAR_DATA_TYPES = (bool, int, float, str, bytes)
_QUICK_LIMITS = dataclasses.replace(DEFAULT_LIMITS, max_elements=QUICK_MAX_VALUES)
_MAX_DTYPE_CHARS = 16


@dataclasses.dataclass(frozen=True)
class CompressedImage:
    """A camera frame in compressed form: its ``format`` (one of :data:`IMAGE_FORMATS`), the encoded
    bytes, and the ``(height, width, 3)`` uint8 shape it decodes to (checked against the image's own header)."""

    format: str
    data: bytes
    shape: tuple[int, int, int]

    def __repr__(self) -> str:
        return f"CompressedImage({self.format}, {len(self.data)} bytes, shape={self.shape})"


def refuse_unsendable(value: np.ndarray | np.generic) -> None:
    """Raise :class:`ProtocolError` for object, structured and complex values: they cannot be rebuilt safely."""
    kind = value.dtype.kind
    if kind in _REFUSED_KINDS:
        raise ProtocolError(f"cannot send a numpy {_REFUSED_KINDS[kind]} array (dtype {value.dtype}); use numeric arrays")


def _encode_numpy(obj: Any) -> Any:
    if isinstance(obj, CompressedImage):
        return {_IMAGE: True, b"format": obj.format, b"data": obj.data, b"shape": list(obj.shape)}
    if isinstance(obj, (np.ndarray, np.generic)):
        refuse_unsendable(obj)
    if isinstance(obj, np.ndarray):
        # tobytes() copies into C order; a C-contiguous array could be sent as a
        # memoryview but msgpack needs a bytes-like object that outlives the call.
        return {_NDARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {_NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise ProtocolError(f"cannot encode a value of type {type(obj).__name__}")


def _decode_numpy(obj: dict, limits: DecodeLimits) -> Any:
    if _NDARRAY in obj:
        return _decode_array(obj, limits)
    if _NPGENERIC in obj:
        return _decode_scalar(obj)
    if _IMAGE in obj:
        return _decode_image(obj, limits)
    return obj


def _decode_image(obj: dict, limits: DecodeLimits) -> CompressedImage:
    """The compressed-image map, checked: a known format, bytes, an ``[H, W, 3]`` shape within the pixel limit."""
    try:
        name, data, shape = obj[b"format"], obj[b"data"], obj[b"shape"]
    except KeyError as exc:
        raise ProtocolError(f"malformed compressed image: missing {exc}") from None
    if name not in IMAGE_FORMATS:
        raise ProtocolError(f"compressed image: unknown format {str(name)[:16]!r} (accepted: {', '.join(IMAGE_FORMATS)})")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed compressed image: 'data' is not bytes")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or any(type(n) is not int for n in shape) or shape[2] != 3:
        raise ProtocolError(f"compressed image: shape must be [height, width, 3], got {str(shape)[:40]}")
    height, width, _ = shape
    if not (0 < height < MAX_DIMENSION and 0 < width < MAX_DIMENSION):
        raise ProtocolError(f"compressed image: shape {shape} has an empty or out-of-range side")
    if height * width > limits.max_image_pixels:
        raise ProtocolError(f"compressed image of {width}x{height} pixels exceeds the {limits.max_image_pixels}-pixel limit (max_image_pixels)")
    return CompressedImage(name, bytes(data), (height, width, 3))


def checked_dtype(spec: Any, what: str) -> np.dtype:
    """The dtype a message names (``"<f4"``, ``"|u1"``); object, structured and complex ones are refused.

    ``what`` names the value in errors. Shared by the msgpack and protobuf decoders.
    """
    # openpi sends dtype.str; a list or dict would describe a structured dtype.
    if not isinstance(spec, (str, bytes)):
        raise ProtocolError(f"{what}: dtype must be a string like '<f4', got {type(spec).__name__}")
    # A numeric dtype is a short code. Longer or comma-separated strings go through numpy's
    # structured-dtype parser (ast.literal_eval), which fails in ways of its own (SyntaxError...).
    text = spec.decode(errors="replace") if isinstance(spec, bytes) else spec
    if len(text) > _MAX_DTYPE_CHARS or "," in text or "(" in text or "[" in text:
        raise ProtocolError(f"{what}: unknown dtype {text[:_MAX_DTYPE_CHARS]!r}: send a numeric dtype like '<f4' or '|u1'")
    try:
        dtype = np.dtype(text)
    except Exception:  # numpy raises TypeError, ValueError, SyntaxError... for strings it cannot read
        raise ProtocolError(f"{what}: unknown dtype {text!r}") from None
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise ProtocolError(f"{what}: refusing dtype {dtype} ({_REFUSED_KINDS.get(dtype.kind, 'object')} values are not accepted)")
    return dtype


def checked_array(data: bytes | bytearray | memoryview, dtype: np.dtype, shape: Any, what: str, limits: DecodeLimits) -> np.ndarray:
    """A read-only array over ``data`` (no copy), once ``shape`` is checked against ``limits`` and the byte count.

    ``what`` names the array in errors. Shared by the msgpack and protobuf decoders.
    """
    if len(shape) > limits.max_ndim:
        raise ProtocolError(f"{what}: shape has {len(shape)} dimensions (limit max_ndim={limits.max_ndim})")
    for n in shape:
        if type(n) is not int:
            raise ProtocolError(f"{what}: dimension {n!r} is not an integer")
        if not 0 <= n < MAX_DIMENSION:
            raise ProtocolError(f"{what}: dimension {n} is out of range (0 <= n < 2**40)")
    shape = tuple(shape)
    expected = dtype.itemsize * math.prod(shape)  # exact: Python integers do not overflow
    if len(data) != expected:
        raise ProtocolError(f"{what}: {len(data)} bytes of data, but shape {shape} and dtype {dtype} need {expected}")
    try:
        # frombuffer shares memory with the message: no copy of large images.
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError) as exc:  # e.g. (0, 2**39, 2**39): empty, but too big for numpy
        raise ProtocolError(f"{what}: shape {shape} with dtype {dtype}: {exc}") from None


def _decode_scalar(obj: dict) -> Any:
    try:
        spec, data = obj[b"dtype"], obj[b"data"]
    except KeyError as exc:
        raise ProtocolError(f"malformed numpy scalar: missing {exc}") from None
    dtype = checked_dtype(spec, "numpy scalar")
    # A list would make an array, and np.void(n) would allocate n bytes.
    if not isinstance(data, _SCALAR_DATA_TYPES):
        raise ProtocolError(f"malformed numpy scalar: data must be a number or string, got {type(data).__name__}")
    try:
        return dtype.type(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"malformed numpy scalar: {exc}") from None


def _decode_array(obj: dict, limits: DecodeLimits) -> np.ndarray:
    try:
        spec, shape, data = obj[b"dtype"], obj[b"shape"], obj[b"data"]
    except KeyError as exc:
        raise ProtocolError(f"malformed numpy array: missing {exc}") from None
    dtype = checked_dtype(spec, "numpy array")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed numpy array: 'data' is not bytes")
    if not isinstance(shape, (list, tuple)):
        raise ProtocolError(f"malformed numpy array: shape must be a list of integers, got {type(shape).__name__}")
    return checked_array(data, dtype, shape, "numpy array", limits)


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


def unpackb(data: bytes | bytearray | memoryview, limits: DecodeLimits | None = None) -> Any:
    """Decode a message; raises :class:`ProtocolError` when it is not valid msgpack or breaks ``limits``.

    ``limits`` defaults to :data:`~policylink.limits.DEFAULT_LIMITS`.
    """
    if limits is None:
        limits = DEFAULT_LIMITS
    if not isinstance(data, (bytes, bytearray)):
        try:
            data = memoryview(data).cast("B")
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"message is not valid msgpack: {exc}") from None
    _scan(data, limits)
    size = len(data)

    def hook(obj: dict) -> Any:
        return _decode_numpy(obj, limits)

    try:
        return msgpack.unpackb(
            data,
            object_hook=hook,
            raw=False,
            strict_map_key=False,
            max_str_len=limits.max_str_bytes,
            max_bin_len=size,
            max_ext_len=size,
            max_array_len=limits.max_elements,
            max_map_len=limits.max_elements,
        )
    except ProtocolError:
        raise
    except msgpack.StackError:  # only with a max_depth above msgpack's own fixed limit
        raise ProtocolError("message nests deeper than msgpack can decode (1024 levels)") from None
    except (msgpack.ExtraData, msgpack.FormatError, ValueError, TypeError) as exc:
        raise ProtocolError(f"message is not valid msgpack: {exc}") from None


def quick_unpackb(data: bytes | bytearray) -> Any | None:
    """``data`` decoded when that is sure to be cheap; ``None`` when it may not be, or is not valid msgpack.

    Cheap means at most :data:`QUICK_MAX_BYTES` bytes and
    :data:`QUICK_MAX_VALUES` values (a camera frame is one value whatever its
    size): such a message decodes in tens of microseconds, less than handing
    it to a thread costs, so a server may decode it on its event loop. For
    ``None``, :func:`unpackb` decodes it (on a thread) and names any problem.
    """
    if len(data) > QUICK_MAX_BYTES:
        return None
    try:
        return unpackb(data, _QUICK_LIMITS)
    except ProtocolError:
        return None


# -- the pass over the headers ------------------------------------------------
#
# For each first byte: (kind, argument). _FIX: a value of ``argument`` bytes in
# all. _STR, _BIN, _EXT: the length follows in ``argument`` bytes (0: in the
# low 5 bits, fixstr). _ARR, _MAP: the count follows in ``argument`` bytes (0:
# in the low 4 bits). _BAD: never used by msgpack (0xc1).
_FIX, _STR, _BIN, _EXT, _ARR, _MAP, _BAD = range(7)


def _type_table(check_fixstr: bool) -> tuple[tuple[int, int], ...]:
    table = [(_FIX, 1)] * 256  # positive and negative fixint, nil, false, true
    for b in range(0x80, 0x90):
        table[b] = (_MAP, 0)
    for b in range(0x90, 0xA0):
        table[b] = (_ARR, 0)
    for b in range(0xA0, 0xC0):
        table[b] = (_STR, 0) if check_fixstr else (_FIX, 1 + (b & 0x1F))
    table[0xC1] = (_BAD, 0)
    table[0xC4:0xCA] = [(_BIN, 1), (_BIN, 2), (_BIN, 4), (_EXT, 1), (_EXT, 2), (_EXT, 4)]
    table[0xCA:0xD9] = [(_FIX, size) for size in (5, 9, 2, 3, 5, 9, 2, 3, 5, 9, 3, 4, 6, 10, 18)]
    table[0xD9:0xE0] = [(_STR, 1), (_STR, 2), (_STR, 4), (_ARR, 2), (_ARR, 4), (_MAP, 2), (_MAP, 4)]
    return tuple(table)


_TYPES = _type_table(check_fixstr=False)
_TYPES_CHECKING_FIXSTR = _type_table(check_fixstr=True)  # for max_str_bytes < 31
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from


def _scan(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> None:
    """Check one msgpack message against ``limits`` without building it.

    Counts every value as its container's header announces it, so a container
    past the budget is refused before its items are read; the cost is
    proportional to the values read, at most ``max_elements``.
    """
    max_elements, max_depth, max_str = limits.max_elements, limits.max_depth, limits.max_str_bytes
    types = _TYPES if max_str >= 31 else _TYPES_CHECKING_FIXSTR
    stack: list[int] = []  # items left in each enclosing container
    left = 1  # items left in the current container (the message: one value)
    total = 1
    pos = 0
    try:
        while True:
            if not left:
                if not stack:
                    break
                left = stack.pop()
                continue
            left -= 1
            b = data[pos]
            kind, arg = types[b]
            if kind == _FIX:
                pos += arg
            elif kind >= _ARR:
                if kind == _BAD:
                    raise ProtocolError(f"message is not valid msgpack: byte 0x{b:02x} at offset {pos} starts no value")
                if arg == 0:
                    count = b & 0x0F
                    pos += 1
                elif arg == 2:
                    count = _U16(data, pos + 1)[0]
                    pos += 3
                else:
                    count = _U32(data, pos + 1)[0]
                    pos += 5
                if kind == _MAP:
                    count *= 2  # keys and values
                total += count
                if total > max_elements:
                    raise ProtocolError(
                        f"message has more than {max_elements} elements (limit max_elements={max_elements}); "
                        "send arrays as numpy arrays, not lists"
                    )
                if len(stack) >= max_depth:
                    raise ProtocolError(f"message nests deeper than {max_depth} levels (limit max_depth={max_depth})")
                if count:
                    stack.append(left)
                    left = count
            else:
                if arg == 0:
                    size = b & 0x1F
                    pos += 1
                elif arg == 1:
                    size = data[pos + 1]
                    pos += 2
                elif arg == 2:
                    size = _U16(data, pos + 1)[0]
                    pos += 3
                else:
                    size = _U32(data, pos + 1)[0]
                    pos += 5
                if kind == _STR and size > max_str:
                    raise ProtocolError(f"message has a string of {size} bytes (limit max_str_bytes={max_str})")
                pos += size + (kind == _EXT)  # an ext value has a type byte before its data
    except (IndexError, struct.error):
        pos = len(data) + 1
    if pos != len(data):
        if pos > len(data):
            raise ProtocolError("message is not valid msgpack: it ends in the middle of a value (truncated)")
        raise ProtocolError(f"message is not valid msgpack: {len(data) - pos} bytes of extra data after the message")
