"""Camera frames and state vectors out of observations, and JPEG coding.

Shared by the monitor (live frames) and the recorder (``images/``). JPEG
coding uses Pillow, or OpenCV when Pillow is missing; the robot-side base
install has neither, so ``pip install 'policylink[monitor]'`` brings Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["camera_frames", "state_vector", "encode_jpeg", "decode_jpeg", "jpeg_available", "JPEG_MISSING"]

#: The message raised when neither Pillow nor OpenCV can be imported.
JPEG_MISSING = "JPEG encoding needs Pillow (pip install 'policylink[monitor]') or OpenCV"

_IMAGE_PREFIXES = ("observation.images.", "observation/images/")
_SINGLE_IMAGE_KEYS = {"observation.image": "image", "observation/image": "image", "observation/wrist_image": "wrist_image"}
_STATE_KEYS = ("observation.state", "observation/state", "state")


def camera_frames(obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ``HxWx3 uint8`` camera frames of ``obs`` by short camera name.

    Understands LeRobot keys (``observation.images.front``), openpi keys
    (``observation/image``) and the nested ``{"images": {cam: ...}}`` form.
    Anything that is not an ``HxWx3`` (or ``HxW``) uint8 array is ignored.
    """
    frames: dict[str, np.ndarray] = {}
    for key, value in obs.items():
        name = _SINGLE_IMAGE_KEYS.get(key)
        for prefix in _IMAGE_PREFIXES:
            if key.startswith(prefix):
                name = key[len(prefix):]
        if name is not None and _is_frame(value):
            frames[name] = value
    nested = obs.get("images")
    if isinstance(nested, Mapping):
        frames.update({str(name): value for name, value in nested.items() if _is_frame(value)})
    return frames


def state_vector(obs: Mapping[str, Any]) -> np.ndarray | None:
    """The robot state of ``obs`` as a flat float32 vector, or ``None`` if it has none.

    The nested ``{"states": {"left_arm": ..., "right_arm": ...}}`` form is
    concatenated in key order.
    """
    for key in _STATE_KEYS:
        if key in obs:
            return np.asarray(obs[key], dtype=np.float32).reshape(-1)
    nested = obs.get("states")
    if isinstance(nested, Mapping) and nested:
        return np.concatenate([np.asarray(value, dtype=np.float32).reshape(-1) for value in nested.values()])
    return None


def _is_frame(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint8 and (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3)))


def jpeg_available() -> bool:
    """Whether :func:`encode_jpeg` can work here."""
    try:
        _backend()
    except ImportError:
        return False
    return True


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """Encode an ``HxWx3`` RGB (or ``HxW`` grey) uint8 frame as JPEG bytes."""
    backend, module = _backend()
    frame = np.ascontiguousarray(frame)
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
    backend, module = _backend()
    if backend == "pillow":
        return np.asarray(module.open(io.BytesIO(data)).convert("RGB"))
    frame = module.imdecode(np.frombuffer(data, np.uint8), module.IMREAD_COLOR)
    if frame is None:
        raise ValueError("not a JPEG image")
    return frame[..., ::-1].copy()


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
