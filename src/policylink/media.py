"""Camera frames and state vectors out of observations, and JPEG coding.

Shared by the monitor (live frames), the recorder (``images/``) and
compressed camera frames on the wire (:mod:`policylink.compression`). JPEG
coding uses simplejpeg (libjpeg-turbo; the fastest here, see BENCHMARKS.md),
else Pillow, else OpenCV; the robot-side base install has none of them:
``pip install 'policylink[jpeg]'`` brings simplejpeg, ``[monitor]`` Pillow.

:func:`decode_image` is the decoder for images that arrive from the network:
it accepts only the formats it is given (JPEG, PNG), reads the image's size
from its header (:func:`image_header`, a small parser of the JPEG frame
header and the PNG ``IHDR`` chunk) and refuses an image larger than
``max_pixels`` before any pixel is decoded.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import ProtocolError

__all__ = [
    "camera_frames",
    "state_vector",
    "state_part_order",
    "encode_jpeg",
    "decode_jpeg",
    "decode_image",
    "image_header",
    "ImageDecodeError",
    "ImageTooLarge",
    "jpeg_available",
    "png_available",
    "JPEG_MISSING",
]

#: The message raised when no JPEG coder can be imported.
JPEG_MISSING = "JPEG coding needs simplejpeg (pip install 'policylink[jpeg]'), Pillow or OpenCV"

_IMAGE_PREFIXES = ("observation.images.", "observation/images/")
_SINGLE_IMAGE_KEYS = {"observation.image": "image", "observation/image": "image", "observation/wrist_image": "wrist_image"}
_STATE_KEYS = ("observation.state", "observation/state", "state")


def camera_frames(obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ``HxWx3 uint8`` camera frames of ``obs`` by short camera name.

    Understands LeRobot keys (``observation.images.front``), openpi keys
    (``observation/image``, ``observation/<camera>_image``) and the nested ``{"images": {cam: ...}}`` form.
    Anything that is not an ``HxWx3`` (or ``HxW``) uint8 array is ignored.
    """
    frames: dict[str, np.ndarray] = {}
    for key, value in obs.items():
        name = _SINGLE_IMAGE_KEYS.get(key)
        for prefix in _IMAGE_PREFIXES:
            if key.startswith(prefix):
                name = key[len(prefix):]
        if name is None and isinstance(key, str) and key.startswith("observation/") and key.endswith("_image"):
            name = key[len("observation/"):-len("_image")]  # openpi style: observation/<camera>_image
        if name is not None and _is_frame(value):
            frames[name] = value
    nested = obs.get("images")
    if isinstance(nested, Mapping):
        frames.update({str(name): value for name, value in nested.items() if _is_frame(value)})
    return frames


def state_part_order(names: Iterable[Any]) -> list[Any]:
    """The order in which the parts of a nested ``states`` map are joined into one vector.

    Left before right, whatever order the map happens to have: parts whose
    name starts with ``left`` come first, then parts named otherwise (in the
    order given), then parts whose name starts with ``right``; case is
    ignored. So ``{"right_arm": r, "left_arm": l}`` joins as ``[l, r]``.
    Everything that joins ``states`` (the recorder and monitor through
    :func:`state_vector`, the server's observation mapping) uses this order.
    """

    def rank(name: Any) -> int:
        text = str(name).lower()
        return 0 if text.startswith("left") else 2 if text.startswith("right") else 1

    return sorted(names, key=rank)  # stable: parts of the same rank keep their order


def state_vector(obs: Mapping[str, Any]) -> np.ndarray | None:
    """The robot state of ``obs`` as a flat float32 vector, or ``None`` if it has none.

    The nested ``{"states": {"left_arm": ..., "right_arm": ...}}`` form is
    concatenated left before right (:func:`state_part_order`), as the server
    joins it for the policy.
    """
    for key in _STATE_KEYS:
        if key in obs:
            return np.asarray(obs[key], dtype=np.float32).reshape(-1)
    nested = obs.get("states")
    if isinstance(nested, Mapping) and nested:
        return np.concatenate([np.asarray(nested[name], dtype=np.float32).reshape(-1) for name in state_part_order(nested)])
    return None


def _is_frame(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint8 and (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3)))


def jpeg_available() -> bool:
    """Whether :func:`encode_jpeg` can work here."""
    return _importable(_jpeg_backend)


def png_available() -> bool:
    """Whether PNG images can be decoded here (Pillow or OpenCV)."""
    return _importable(_backend)


def _importable(backend: Any) -> bool:
    try:
        backend()
    except ImportError:
        return False
    return True


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """Encode an ``HxWx3`` RGB (or ``HxW`` grey) uint8 frame as JPEG bytes (colour at 4:2:0, as every backend does)."""
    backend, module = _jpeg_backend()
    frame = np.ascontiguousarray(frame)
    if backend == "simplejpeg":
        if frame.ndim == 2 or frame.shape[-1] == 1:
            return module.encode_jpeg(frame.reshape(*frame.shape[:2], 1), quality=quality, colorspace="GRAY", colorsubsampling="Gray")
        return module.encode_jpeg(frame, quality=quality, colorspace="RGB", colorsubsampling="420")
    if frame.ndim == 3 and frame.shape[-1] == 1:
        frame = frame[..., 0]
    if backend == "pillow":
        buffer = io.BytesIO()
        module.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()
    if frame.ndim == 3:
        frame = frame[..., ::-1]  # OpenCV wants BGR
    ok, data = module.imencode(".jpg", frame, [module.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"OpenCV could not encode a frame of shape {frame.shape}")
    return data.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode JPEG bytes into an ``HxWx3`` RGB uint8 array."""
    backend, module = _jpeg_backend()
    if backend == "simplejpeg":
        return module.decode_jpeg(bytes(data), colorspace="RGB")
    if backend == "pillow":
        return np.asarray(module.open(io.BytesIO(data)).convert("RGB"))
    frame = module.imdecode(np.frombuffer(data, np.uint8), module.IMREAD_COLOR)
    if frame is None:
        raise ValueError("not a JPEG image")
    return frame[..., ::-1].copy()


class ImageDecodeError(ProtocolError, ValueError):
    """A compressed image is corrupt, of a format not accepted, or too large to decode."""


class ImageTooLarge(ImageDecodeError):
    """A compressed image's header claims more pixels than the limit allows."""


_DECODABLE = ("JPEG", "PNG")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOFn): baseline, extended, progressive, lossless, hierarchical, arithmetic.
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_STANDALONE = frozenset((0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))  # markers without a length


def _format_name(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return "unknown"


def image_header(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` of JPEG or PNG ``data``, read from its header without decoding.

    Raises :class:`ImageDecodeError` when ``data`` is neither, or its header
    is truncated or corrupt.
    """
    data = bytes(data)
    name = _format_name(data)
    if name == "JPEG":
        width, height = _jpeg_size(data)
    elif name == "PNG":
        if len(data) < 24:
            raise ImageDecodeError("not a decodable PNG image (truncated header)")
        if data[12:16] != b"IHDR":
            raise ImageDecodeError("not a decodable PNG image (it does not start with an IHDR chunk)")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    else:
        raise ImageDecodeError(f"image format {name} cannot be decoded (only {', '.join(_DECODABLE)})")
    return name, width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from the JPEG frame header (SOFn), read up to the first scan."""
    size = None
    pos, end = 2, len(data)
    while True:
        pos = data.find(b"\xff", pos)  # skips junk between segments, as libjpeg does
        if pos < 0:
            raise ImageDecodeError("not a decodable JPEG image (it ends before its first scan)")
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            raise ImageDecodeError("not a decodable JPEG image (it ends before its first scan)")
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise ImageDecodeError("not a decodable JPEG image (it ends before its first scan)")
        if pos + 2 > end:
            raise ImageDecodeError("not a decodable JPEG image (truncated header)")
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2:
            raise ImageDecodeError(f"not a decodable JPEG image (segment of length {length} at byte {pos})")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 7 > end:
                raise ImageDecodeError("not a decodable JPEG image (truncated frame header)")
            if size is not None:
                raise ImageDecodeError("not a decodable JPEG image (more than one frame header)")
            height = (data[pos + 3] << 8) | data[pos + 4]
            width = (data[pos + 5] << 8) | data[pos + 6]
            size = (width, height)
        elif marker == 0xDA:  # start of scan: the frame header must have come
            if size is None:
                raise ImageDecodeError("not a decodable JPEG image (no frame header before its first scan)")
            return size
        pos += length


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image of {width}x{height} pixels has an empty side")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image of {width}x{height} pixels exceeds the {max_pixels}-pixel limit")


def decode_image(data: bytes, max_pixels: int, formats: tuple[str, ...] = ("JPEG", "PNG")) -> np.ndarray:
    """Decode a compressed image from the network into an ``HxWx3`` RGB uint8 array.

    Only ``formats`` (a subset of ``("JPEG", "PNG")``) are accepted, whatever
    else the image library can read. The width and height are read from the
    header and checked (each side > 0, ``width * height <= max_pixels``)
    before anything is decoded. Raises :class:`ImageTooLarge` /
    :class:`ImageDecodeError` (both ``ProtocolError`` and ``ValueError``),
    or :class:`ImportError` when neither Pillow nor OpenCV is installed.
    """
    accepted = tuple(name.upper() for name in formats)
    if not accepted or any(name not in _DECODABLE for name in accepted):
        raise ValueError(f"decode_image formats must be among {_DECODABLE}, got {formats!r}")
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    data = bytes(data)
    name = _format_name(data)
    if name not in accepted:
        raise ImageDecodeError(f"image format {name} is not accepted (accepted: {', '.join(accepted)})")
    name, width, height = image_header(data)
    _check_size(width, height, max_pixels)
    backend, module = _jpeg_backend() if name == "JPEG" else _backend()
    if backend == "simplejpeg":
        return _decode_simplejpeg(module, data, width, height)
    if backend == "pillow":
        return _decode_pillow(module, data, name, width, height)
    frame = module.imdecode(np.frombuffer(data, np.uint8), module.IMREAD_COLOR)
    if frame is None:
        raise ImageDecodeError(f"not a decodable {name} image")
    if frame.shape[:2] != (height, width):
        raise ImageDecodeError(f"not a decodable {name} image (header says {width}x{height}, decoded {frame.shape[1]}x{frame.shape[0]})")
    return frame[..., ::-1].copy()


def _decode_pillow(image_module: Any, data: bytes, name: str, width: int, height: int) -> np.ndarray:
    # Pillow warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and refuses
    # twice that; the size is known already, so refuse here instead of warning.
    bomb_limit = image_module.MAX_IMAGE_PIXELS
    if bomb_limit is not None and width * height > bomb_limit:
        raise ImageTooLarge(f"image of {width}x{height} pixels exceeds Pillow's {bomb_limit}-pixel decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)")
    try:
        with image_module.open(io.BytesIO(data), formats=[name]) as image:
            if image.size != (width, height):  # a header our parser and Pillow read differently
                raise ImageDecodeError(f"not a decodable {name} image (header says {width}x{height}, Pillow reads {image.size[0]}x{image.size[1]})")
            rgb = image.convert("RGB")
    except ImageDecodeError:
        raise
    except (image_module.DecompressionBombError, image_module.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image of {width}x{height} pixels: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's plugins raise many kinds (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(f"not a decodable {name} image ({type(exc).__name__}: {exc})") from None
    return np.asarray(rgb)


def _decode_simplejpeg(module: Any, data: bytes, width: int, height: int) -> np.ndarray:
    try:
        # strict: libjpeg's recoverable errors (a truncated or damaged stream) are errors, not grey patches.
        frame = module.decode_jpeg(data, colorspace="RGB", strict=True)
    except MemoryError:
        raise
    except Exception as exc:  # simplejpeg raises ValueError for corrupt data, but be safe
        raise ImageDecodeError(f"not a decodable JPEG image ({type(exc).__name__}: {exc})") from None
    if frame.shape[:2] != (height, width):
        raise ImageDecodeError(f"not a decodable JPEG image (header says {width}x{height}, decoded {frame.shape[1]}x{frame.shape[0]})")
    return frame


def _jpeg_backend() -> tuple[str, Any]:
    """The JPEG coder: simplejpeg when installed, else :func:`_backend`'s."""
    try:
        import simplejpeg

        return "simplejpeg", simplejpeg
    except ImportError:
        return _backend()


def _backend() -> tuple[str, Any]:
    try:
        from PIL import Image

        return "pillow", Image
    except ImportError:
        pass
    try:
        import cv2

        return "opencv", cv2
    except ImportError:
        raise ImportError(JPEG_MISSING) from None
