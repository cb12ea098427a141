"""Map the observation layouts clients send onto a policy's input features.

Three conventions are accepted, and may be mixed in one observation:

- LeRobot keys: ``observation.state``, ``observation.images.<cam>``,
  ``observation.environment_state``, ``task``;
- openpi keys: ``observation/state``, ``observation/image`` (the policy's
  first camera), ``observation/<cam>_image`` (e.g. ``observation/wrist_image``
  for a ``wrist`` camera), ``prompt``; any ``/`` in a key reads as ``.``;
- nested: ``{"images": {cam: image}, "states": {"arm": (6,)}}`` or
  ``{"states": {"left_arm": (6,), "right_arm": (6,)}}`` (left before right;
  other part names are joined in the order sent).

Images may be ``HxWx3`` uint8 (the usual camera frame), ``3xHxW`` float in
[0, 1] (LeRobot's tensor layout), or JPEG/PNG bytes. They are checked here and
resized by the backend to the policy's input size. Keys the policy does not
read (timestamps, step counters) are ignored.

Every mismatch raises :class:`~policylink.errors.RequestError` with a message
naming the problem, e.g. ``state has 12 values, the policy expects 6``.
This module needs only numpy (and Pillow for compressed images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import RequestError
from ..limits import DEFAULT_LIMITS
from ..media import decode_image, state_part_order

__all__ = ["ObservationSpec", "MappedObservation", "map_observation", "parse_rename_map"]

STATE = "observation.state"
ENV_STATE = "observation.environment_state"
IMAGES_PREFIX = "observation.images."
#: Keys that carry the language instruction, in order of preference.
TASK_KEYS = ("task", "prompt")


@dataclasses.dataclass(frozen=True)
class ObservationSpec:
    """What a policy reads, in the terms clients use.

    ``cameras`` maps each camera's short name (``front`` for
    ``observation.images.front``) to the policy's feature key, in the
    policy's order. ``rename_map`` maps client camera names to policy camera
    names (``{"top": "front"}``).
    """

    state_dim: int | None = None
    env_state_dim: int | None = None
    cameras: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rename_map: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_feature_keys(cls, keys: Mapping[str, tuple[int, ...]], rename_map: Mapping[str, str] | None = None) -> ObservationSpec:
        """Build a spec from LeRobot input feature keys and their shapes."""
        cameras = {camera_name(key): key for key in keys if is_camera_key(key)}
        state = keys.get(STATE)
        env = keys.get(ENV_STATE)
        return cls(
            state_dim=int(np.prod(state)) if state is not None else None,
            env_state_dim=int(np.prod(env)) if env is not None else None,
            cameras=cameras,
            rename_map=dict(rename_map or {}),
        )


@dataclasses.dataclass
class MappedObservation:
    """An observation in the policy's terms, checked.

    ``images`` maps policy feature keys to ``HxWx3`` uint8 or ``3xHxW``
    float32 arrays (not yet resized).
    """

    state: np.ndarray | None
    env_state: np.ndarray | None
    images: dict[str, np.ndarray]
    task: str | None


def is_camera_key(key: str) -> bool:
    """Whether a LeRobot feature key is an image (``observation.image``, ``observation.images.*``)."""
    return key == "observation.image" or key.startswith(IMAGES_PREFIX)


def camera_name(key: str) -> str:
    """The short camera name of a feature key: ``front`` for ``observation.images.front``."""
    return key[len(IMAGES_PREFIX):] if key.startswith(IMAGES_PREFIX) else key.rpartition(".")[2]


def parse_rename_map(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """Accept ``{"top": "front"}`` or the command-line form ``top=front,side=wrist``."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in str(value).split(","))):
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise ValueError(f"bad rename {item!r}: expected CLIENT_NAME=POLICY_NAME, e.g. top=front")
        pairs[source.strip()] = target.strip()
    return pairs


def map_observation(obs: Mapping[str, Any], spec: ObservationSpec, default_task: str | None = None) -> MappedObservation:
    """Check ``obs`` against ``spec`` and return it in the policy's terms."""
    state, env_state, raw_images, task = _collect(obs)
    mapped = MappedObservation(state=None, env_state=None, images={}, task=task if task is not None else default_task)
    if spec.state_dim is not None:
        if state is None:
            raise RequestError(
                f"{STATE} missing; the policy expects a state of {spec.state_dim} values "
                f"(send '{STATE}', 'observation/state' or states={{'arm': ...}})"
            )
        mapped.state = _vector(state, STATE, spec.state_dim, "state")
    if spec.env_state_dim is not None:
        if env_state is None:
            raise RequestError(f"{ENV_STATE} missing; the policy expects {spec.env_state_dim} values")
        mapped.env_state = _vector(env_state, ENV_STATE, spec.env_state_dim, "environment state")
    images = _resolve_cameras(raw_images, spec)
    for name, key in spec.cameras.items():
        mapped.images[key] = _image(images[name], name)
    return mapped


# -- collecting the three conventions -------------------------------------


def _collect(obs: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any], str | None]:
    """Find state, environment state, images (by client camera name) and task in ``obs``."""
    state: Any = None
    env_state: Any = None
    images: dict[str, Any] = {}
    task: str | None = None
    for raw_key, value in obs.items():
        key = str(raw_key).replace("/", ".")
        if key in TASK_KEYS:
            if task is None or key == "task":
                task = _text(value, str(raw_key))
        elif key in (STATE, "state"):
            state = value
        elif key == "states":
            state = _join_states(value)
        elif key in (ENV_STATE, "environment_state"):
            env_state = value
        elif key == "images":
            if not isinstance(value, Mapping):
                raise RequestError(f"'images' must map camera names to images, got {type(value).__name__}")
            images.update({str(name): image for name, image in value.items()})
        elif key.startswith(IMAGES_PREFIX):
            images[key[len(IMAGES_PREFIX):]] = value
        elif key.startswith("observation.") and key.endswith("image"):
            # openpi style: observation/image, observation/wrist_image.
            images[key[len("observation."):]] = value
    return state, env_state, images, task


def _text(value: Any, key: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise RequestError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _join_states(states: Any) -> np.ndarray:
    """``{"arm": v}`` -> v; ``{"left_arm": l, "right_arm": r}`` -> [l, r]; else joined in the order sent."""
    if not isinstance(states, Mapping) or not states:
        raise RequestError("'states' must map part names (e.g. 'arm' or 'left_arm'/'right_arm') to vectors")
    # Left before right, whatever order the client's map happens to have: the
    # one order shared with the recorder and the monitor (media.state_vector).
    names = state_part_order(states)
    parts = [_as_float(states[name], f"states[{name!r}]").reshape(-1) for name in names]
    return np.concatenate(parts)


def _resolve_cameras(images: dict[str, Any], spec: ObservationSpec) -> dict[str, Any]:
    """Map client camera names onto the policy's, via the rename map and openpi aliases."""
    wanted = list(spec.cameras)
    resolved: dict[str, Any] = {}
    aliases: list[tuple[str, Any]] = []
    for name, image in images.items():
        name = spec.rename_map.get(name, name)
        if name in spec.cameras:
            resolved[name] = image
        else:
            aliases.append((name, image))
    for name, image in aliases:
        target = _alias_target(name, wanted, resolved)
        if target is not None:
            resolved[target] = image
    missing = [name for name in wanted if name not in resolved]
    if missing:
        sent = sorted(images)
        hint = "; map other names with a rename map" if sent else ""
        raise RequestError(f"camera {missing[0]!r} missing; policy needs {wanted} (got {sent}{hint})")
    return resolved


def _alias_target(name: str, wanted: list[str], resolved: Mapping[str, Any]) -> str | None:
    """openpi names: ``image`` is the first free camera, ``wrist_image`` the ``wrist`` one."""
    if name == "image":
        return next((cam for cam in wanted if cam not in resolved), None)
    if name.endswith("_image") and name[: -len("_image")] in wanted and name[: -len("_image")] not in resolved:
        return name[: -len("_image")]
    return None


# -- checking values ------------------------------------------------------


def _as_float(value: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be numbers, got {type(value).__name__}") from None
    return array


def _vector(value: Any, key: str, expected: int, what: str) -> np.ndarray:
    array = _as_float(value, key)
    # Tolerate a leading batch dimension of 1 (some clients always batch).
    while array.ndim > 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise RequestError(f"{key} must be a vector, got shape {array.shape}")
    if array.shape[0] != expected:
        raise RequestError(f"{what} has {array.shape[0]} values, the policy expects {expected}")
    if np.isnan(array).any():
        raise RequestError(f"NaN in {key}")
    if not np.isfinite(array).all():
        raise RequestError(f"infinite value in {key}")
    return array


def _image(value: Any, camera: str) -> np.ndarray:
    """``HxWx3`` uint8 or ``3xHxW`` float32 in [0, 1]; JPEG/PNG bytes are decoded."""
    if isinstance(value, (bytes, bytearray)):
        value = _decode_image(bytes(value), camera)
    array = np.asarray(value)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise RequestError(f"camera {camera!r} image has shape {array.shape}; expected HxWx3 uint8 or 3xHxW float")
    if array.dtype == np.uint8:
        return array if array.shape[-1] == 3 else np.ascontiguousarray(array.transpose(1, 2, 0))
    if not np.issubdtype(array.dtype, np.floating):
        raise RequestError(f"camera {camera!r} image has dtype {array.dtype}; expected uint8 (0-255) or float (0-1)")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise RequestError(f"NaN or infinite value in camera {camera!r} image")
    return array if array.shape[0] == 3 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _decode_image(data: bytes, camera: str) -> np.ndarray:
    """JPEG or PNG bytes to ``HxWx3`` uint8, with the size checked before decoding (no decompression bombs)."""
    try:
        return decode_image(data, DEFAULT_LIMITS.max_image_pixels)
    except ImportError:
        raise RequestError(f"camera {camera!r} image is compressed, but the server lacks Pillow to decode it") from None
    except ValueError as exc:
        raise RequestError(f"camera {camera!r} image could not be decoded: {exc}") from None
