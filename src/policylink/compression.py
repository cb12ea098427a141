"""Compressed camera frames: the client compresses them, the server decodes them before the policy sees them.

Raw frames are the default (openpi's clients and servers send raw arrays).
On a slow link a client can send JPEG instead: three 480x640 frames are
about 2.8 MB raw and some 100-200 KB as JPEG. :func:`compress_images`
replaces every ``HxWx3`` uint8 array of an observation (nested maps included)
by a :class:`~policylink.codec.CompressedImage`; :func:`decompress_images`,
on the server's decode threads, turns them back into arrays. It reads each
image's size from its header and checks it against the shape the message
declares and the pixel limit before anything is decoded, so a corrupt
image or a decompression bomb costs the server nothing and is answered with
an error naming the key.

The JPEG coder is :mod:`simplejpeg` when installed (``pip install
'policylink[jpeg]'``: libjpeg-turbo in a small wheel), else Pillow, else
OpenCV; see :mod:`policylink.media`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .codec import IMAGE_FORMATS, CompressedImage
from .errors import ProtocolError
from .limits import DEFAULT_LIMITS, DecodeLimits

__all__ = ["IMAGE_CODECS", "check_image_codec", "compress_images", "decompress_images", "decodable_formats", "has_images"]

#: What a client may ask for: raw arrays (the default) or JPEG.
IMAGE_CODECS = ("raw", "jpeg")


def check_image_codec(codec: str | None, quality: int) -> str:
    """The codec name (``raw`` for ``None``); ``ValueError`` for an unknown one or a quality outside 1-100,
    ``ImportError`` when JPEG is asked for and no JPEG coder is installed."""
    codec = (codec or "raw").lower()
    if codec not in IMAGE_CODECS:
        raise ValueError(f"unknown image codec {codec!r}; use one of {list(IMAGE_CODECS)}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"image quality must be an integer from 1 to 100, got {quality!r}")
    if codec == "jpeg":
        from .media import jpeg_available

        if not jpeg_available():
            raise ImportError("image_codec='jpeg' needs a JPEG coder: pip install 'policylink[jpeg]' (simplejpeg), or Pillow / OpenCV")
    return codec


def compress_images(obs: Mapping[str, Any], quality: int = 90) -> dict[str, Any]:
    """``obs`` with every ``HxWx3`` uint8 array (camera frames, nested maps included) as JPEG."""
    from .media import encode_jpeg

    def walk(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] == 3 and value.size:
            return CompressedImage("jpeg", encode_jpeg(value, quality), tuple(int(n) for n in value.shape))  # type: ignore[arg-type]
        if isinstance(value, Mapping):
            return {key: walk(item) for key, item in value.items()}
        return value

    return walk(obs)


def decompress_images(fields: dict[str, Any], limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """``fields`` with every :class:`~policylink.codec.CompressedImage` decoded to an ``HxWx3`` uint8 array.

    Raises :class:`~policylink.errors.ProtocolError` naming the key for an
    image that is corrupt, of another format than it says, of another size
    than its declared shape, or past ``limits.max_image_pixels``.
    """
    if not has_images(fields):
        return fields
    return _decoded(fields, "", limits)


def decodable_formats() -> list[str]:
    """The compressed formats this process can decode (announced in the server's metadata)."""
    from .media import jpeg_available, png_available

    available = {"jpeg": jpeg_available(), "png": png_available()}
    return [name for name in IMAGE_FORMATS if available[name]]


def has_images(value: Any) -> bool:
    """Whether ``value`` (a decoded message, maps nested) holds a :class:`~policylink.codec.CompressedImage`."""
    if isinstance(value, CompressedImage):
        return True
    return isinstance(value, dict) and any(has_images(item) for item in value.values())


def _decoded(value: Any, key: str, limits: DecodeLimits) -> Any:
    if isinstance(value, CompressedImage):
        return _decode_one(value, key, limits)
    if isinstance(value, dict):
        return {name: _decoded(item, f"{key}.{name}" if key else str(name), limits) for name, item in value.items()}
    return value


def _decode_one(image: CompressedImage, key: str, limits: DecodeLimits) -> np.ndarray:
    from .media import ImageDecodeError, decode_image, image_header

    try:
        name, width, height = image_header(image.data)
        if name.lower() != image.format:
            raise ImageDecodeError(f"the message says {image.format}, the data is {name}")
        if (height, width) != image.shape[:2]:
            raise ImageDecodeError(f"its header says {width}x{height} pixels, the message's shape says {image.shape[1]}x{image.shape[0]}")
        frame = decode_image(image.data, limits.max_image_pixels, (name,))
    except ImageDecodeError as exc:
        raise ProtocolError(f"{key}: compressed image refused: {exc}") from None
    except ImportError as exc:
        raise ProtocolError(f"{key}: this server cannot decode {image.format} images ({exc}); send raw arrays") from None
    return frame
