"""Check a protobuf message's wire format against :class:`DecodeLimits` before parsing it.

Parsing a protobuf message builds every value it holds: a 19 MiB
``Tensor.shape`` of 20 million packed zeros becomes 20 million integers, a
run of empty map entries becomes as many Python objects. :func:`check_wire`
walks the wire format of a serialized message with the message's descriptor
(which fields are sub-messages, maps, strings, packed repeated scalars)
without building anything: it counts field occurrences and packed values,
follows sub-messages, checks string lengths and the length of every
``shape`` field, and skips ``bytes`` fields (image data) by their length. It
stops at the first value past a limit, so its cost is proportional to the
``max_elements`` budget, never to the message; a legitimate observation (a
few tensors and strings) is checked in microseconds.

The walk is also a strict wire-format check: a truncated varint, a length
past the end of its message, a group or undefined wire type, field number 0,
or a known field sent with the wrong wire type is refused.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ..errors import ProtocolError
from ..limits import DEFAULT_LIMITS, DecodeLimits

__all__ = ["check_wire", "WireFormatError"]


class WireFormatError(ProtocolError):
    """The bytes are not a well-formed protobuf encoding of the message."""


# Field kinds, by how they are encoded.
_MSG, _STR, _BYTES, _VARINT, _I64, _I32, _GROUP = range(7)
_WIRE_TYPE = {_MSG: 2, _STR: 2, _BYTES: 2, _VARINT: 0, _I64: 1, _I32: 5, _GROUP: 3}
_KIND_OF_TYPE = {
    FieldDescriptor.TYPE_MESSAGE: _MSG,
    FieldDescriptor.TYPE_STRING: _STR,
    FieldDescriptor.TYPE_BYTES: _BYTES,
    FieldDescriptor.TYPE_GROUP: _GROUP,
    FieldDescriptor.TYPE_DOUBLE: _I64,
    FieldDescriptor.TYPE_FIXED64: _I64,
    FieldDescriptor.TYPE_SFIXED64: _I64,
    FieldDescriptor.TYPE_FLOAT: _I32,
    FieldDescriptor.TYPE_FIXED32: _I32,
    FieldDescriptor.TYPE_SFIXED32: _I32,
}  # every other type (ints, bool, enum) is a varint
_MAX_FIELD_NUMBER = (1 << 29) - 1
_HIGH_BYTES = bytes(range(0x80))  # deleting these leaves the varint continuation bytes

# Per field number: (kind, repeated, is a shape, full name, message descriptor, is a map entry).
_Field = tuple[int, bool, bool, str, Any, bool]
_SCHEMAS: dict[Any, dict[int, _Field]] = {}


def _schema(descriptor: Descriptor) -> dict[int, _Field]:
    schema = _SCHEMAS.get(descriptor)
    if schema is None:
        schema = {}
        for field in descriptor.fields:
            kind = _KIND_OF_TYPE.get(field.type, _VARINT)
            repeated = bool(field.is_repeated) if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED
            child = field.message_type if kind == _MSG else None
            map_entry = child is not None and child.GetOptions().map_entry
            is_shape = repeated and field.name == "shape" and kind in (_VARINT, _I64, _I32)
            schema[field.number] = (kind, repeated, is_shape, field.full_name, child, map_entry)
        _SCHEMAS[descriptor] = schema
    return schema


def check_wire(data: bytes | bytearray | memoryview, descriptor: Descriptor, limits: DecodeLimits | None = None) -> None:
    """Check serialized message ``data`` of type ``descriptor`` against ``limits`` without parsing it.

    Raises :class:`ProtocolError` naming the limit when the message holds more
    than ``max_elements`` field occurrences and packed values, nests
    sub-messages deeper than ``max_depth`` (the message itself is level 1;
    map entries, an encoding detail of map fields, do not count), has a
    string longer than ``max_str_bytes`` or a repeated ``shape`` field with
    more than ``max_ndim`` values; raises :class:`WireFormatError` (a
    ``ProtocolError``) when the bytes are not a well-formed encoding. Stops at
    the first problem. Does not check what only the parser can (UTF-8 of
    strings, required/oneof rules): parse the message afterwards as usual.
    """
    if limits is None:
        limits = DEFAULT_LIMITS
    if not isinstance(data, (bytes, bytearray)):
        data = memoryview(data).cast("B")
    root = descriptor.full_name
    max_elements, max_depth, max_str, max_ndim = limits.max_elements, limits.max_depth, limits.max_str_bytes, limits.max_ndim

    def malformed(detail: str) -> WireFormatError:
        return WireFormatError(f"not a valid {root} protobuf message ({detail})")

    def varint(pos: int, end: int) -> tuple[int, int]:
        result = shift = 0
        start = pos
        while True:
            if pos >= end:
                raise malformed(f"truncated varint at byte {start}")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7
            if shift >= 70:
                raise malformed(f"varint longer than 10 bytes at byte {start}")

    def too_many() -> ProtocolError:
        return ProtocolError(f"{root} message has more than {max_elements} fields and values (limit max_elements={max_elements})")

    def walk(pos: int, end: int, schema: dict[int, _Field], depth: int, total: int) -> int:
        shape_values = 0  # values of this message's repeated ``shape`` field so far
        while pos < end:
            tag_at = pos
            byte = data[pos]
            if byte < 0x80:
                tag = byte
                pos += 1
            else:
                tag, pos = varint(pos, end)
            total += 1
            if total > max_elements:
                raise too_many()
            wire = tag & 7
            number = tag >> 3
            if not 0 < number <= _MAX_FIELD_NUMBER:
                raise malformed(f"field number {number} at byte {tag_at}")
            field = schema.get(number)
            if wire == 2:
                if pos < end and data[pos] < 0x80:
                    length = data[pos]
                    pos += 1
                else:
                    length, pos = varint(pos, end)
                start = pos
                pos += length
                if pos > end:
                    raise malformed(f"field {number} at byte {tag_at} claims {length} bytes, {pos - end} past the end of its message")
                if field is None:
                    continue  # an unknown field: skipped, as the parser keeps it as bytes
                kind = field[0]
                if kind == _MSG:
                    child_depth = depth if field[5] else depth + 1
                    if child_depth > max_depth:
                        raise ProtocolError(
                            f"{root} message nests deeper than {max_depth} levels at field {field[3]} (limit max_depth={max_depth})"
                        )
                    if length:
                        total = walk(start, pos, _schema(field[4]), child_depth, total)
                elif kind == _STR:
                    if length > max_str:
                        raise ProtocolError(f"{root} message: string field {field[3]} is {length} bytes (limit max_str_bytes={max_str})")
                elif kind == _BYTES:
                    pass
                elif field[1] and kind != _GROUP:  # a packed repeated scalar
                    if kind == _VARINT:
                        if field[2] and length > 10 * max_ndim:  # at least length / 10 values
                            raise _shape_error(root, field[3], max_ndim)
                        if length > 10 * (max_elements - total):
                            raise too_many()
                        chunk = data[start:pos]
                        if not isinstance(chunk, (bytes, bytearray)):
                            chunk = bytes(chunk)
                        if length and chunk[-1] >= 0x80:
                            raise malformed(f"truncated varint at the end of packed field {field[3]}")
                        count = length - len(chunk.translate(None, _HIGH_BYTES))
                    else:
                        size = 8 if kind == _I64 else 4
                        if length % size:
                            raise malformed(f"packed field {field[3]} is {length} bytes, not a multiple of {size}")
                        count = length // size
                    total += count
                    if total > max_elements:
                        raise too_many()
                    if field[2]:
                        shape_values += count
                        if shape_values > max_ndim:
                            raise _shape_error(root, field[3], max_ndim)
                else:
                    raise malformed(f"field {field[3]} sent with wire type 2, expected {_WIRE_TYPE[kind]}")
                continue
            if wire == 0:
                if pos < end and data[pos] < 0x80:
                    pos += 1
                else:
                    pos = varint(pos, end)[1]
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire in (3, 4):
                raise malformed(f"group (wire type {wire}) at byte {tag_at}: groups are not supported")
            else:
                raise malformed(f"invalid wire type {wire} at byte {tag_at}")
            if field is not None:
                if _WIRE_TYPE[field[0]] != wire:
                    raise malformed(f"field {field[3]} sent with wire type {wire}, expected {_WIRE_TYPE[field[0]]}")
                if field[2]:
                    shape_values += 1
                    if shape_values > max_ndim:
                        raise _shape_error(root, field[3], max_ndim)
        if pos > end:
            raise malformed(f"the last field runs {pos - end} bytes past the end of its message")
        return total

    walk(0, len(data), _schema(descriptor), 1, 0)


def _shape_error(root: str, name: str, max_ndim: int) -> ProtocolError:
    return ProtocolError(f"{root} message: {name} has more than {max_ndim} values (limit max_ndim={max_ndim})")
