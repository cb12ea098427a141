"""Bounds on what one received message may make the decoder build.

The transports already cap a message's size (``DEFAULT_MAX_MESSAGE_BYTES``),
but a small message can still describe a huge structure: millions of empty
msgpack arrays, a protobuf ``shape`` of millions of zeros, a nesting thousands
of levels deep, or a few-kilobyte JPEG whose header claims 20000x20000
pixels. The decoders (:func:`policylink.codec.unpackb`,
:func:`policylink.proto.convert.observation_from_bytes`,
:func:`policylink.media.decode_image`) check a :class:`DecodeLimits` while
they decode and stop at the first value past a limit, with a
:class:`~policylink.errors.ProtocolError` that names it.

The defaults leave room for any realistic observation (a dozen cameras, state
vectors, a prompt, nested ``{"images": {...}}`` maps), since arrays travel as
numpy arrays (one element each, however large), not as lists.

Pure standard library: the robot-side client imports it too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecodeLimits", "DEFAULT_LIMITS", "MAX_DIMENSION"]

#: Every array dimension must be below this (2**40): larger ones cannot be
#: backed by any message and would only serve to overflow size arithmetic.
MAX_DIMENSION = 1 << 40


@dataclass(frozen=True)
class DecodeLimits:
    """Per-message decoding limits; every field must be a positive integer.

    Attributes:
        max_elements: Values in one message, counted before they are built:
            for msgpack every map, array and scalar (a map entry is two: key
            and value; a numpy array is its small header map, whatever its
            size); for protobuf every field occurrence and every packed value.
            Default 100_000.
        max_depth: Nesting of containers: msgpack maps/arrays (the top-level
            map is level 1; a numpy array's header map and shape list take two
            levels), protobuf sub-messages (map entries not counted), nested
            observation values. Default 32.
        max_str_bytes: UTF-8 bytes in one string, map keys included (binary
            data such as array bytes is not a string). Default 1 MiB.
        max_ndim: Dimensions of one array (numpy ``shape``, protobuf
            ``Tensor.shape``). Default 32 (numpy itself allows 64).
        max_image_pixels: Height times width of one compressed image (JPEG,
            PNG), checked from its header before it is decoded. Default
            16 * 2**20 (16 Mpx, e.g. 4096x4096; a decoded RGB frame of that
            size takes 48 MiB).
    """

    max_elements: int = 100_000
    max_depth: int = 32
    max_str_bytes: int = 1 << 20
    max_ndim: int = 32
    max_image_pixels: int = 16 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_elements", "max_depth", "max_str_bytes", "max_ndim", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DecodeLimits.{name} must be a positive integer, got {value!r}")


#: The limits used when a decoder is given none.
DEFAULT_LIMITS = DecodeLimits()
