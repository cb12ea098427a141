"""Between policylink's Python values and the typed ``policylink.v1`` messages.

Shared by the gRPC server and client. Arrays become :class:`Tensor`
messages (numpy dtype string, shape, C-order bytes); object, void and
complex dtypes are refused, as in the msgpack codec. Decoding checks that
the bytes match the shape and dtype, so a malformed tensor gets an error
that names it instead of a crash inside the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ProtocolError
from ..types import PolicyMetadata
from .v1 import policylink_pb2 as pb

__all__ = [
    "array_to_tensor",
    "tensor_to_array",
    "observation_to_proto",
    "proto_to_observation",
    "chunk_to_proto",
    "proto_to_reply",
    "frame_to_metadata",
    "metadata_to_frame",
]

_REFUSED_KINDS = {"O": "object", "V": "void (structured)", "c": "complex"}


def array_to_tensor(array: Any) -> pb.Tensor:
    array = np.asarray(array)
    if array.dtype.kind in _REFUSED_KINDS:
        raise ProtocolError(f"cannot send a numpy {_REFUSED_KINDS[array.dtype.kind]} array (dtype {array.dtype}); use numeric arrays")
    return pb.Tensor(dtype=array.dtype.str, shape=array.shape, data=np.ascontiguousarray(array).tobytes())


def tensor_to_array(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Rebuild an array; raises :class:`ProtocolError` naming ``name`` when it is malformed."""
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        raise ProtocolError(f"{name}: unknown dtype {tensor.dtype!r}") from None
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise ProtocolError(f"{name}: refusing dtype {dtype} ({_REFUSED_KINDS.get(dtype.kind, 'object')} arrays are not accepted)")
    shape = tuple(tensor.shape)
    if any(n < 0 for n in shape):
        raise ProtocolError(f"{name}: negative dimension in shape {shape}")
    expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(tensor.data) != expected:
        raise ProtocolError(f"{name}: {len(tensor.data)} bytes of data, but shape {shape} and dtype {dtype} need {expected}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def observation_to_proto(obs: Mapping[str, Any], step: int = 0, jpeg_quality: int | None = None) -> pb.Observation:
    """Encode an observation; with ``jpeg_quality``, HxWx3 uint8 frames travel as JPEG."""
    message = pb.Observation(step=int(step))
    _fill(message.fields, obs, jpeg_quality)
    return message


def _fill(fields: Any, values: Mapping[str, Any], jpeg_quality: int | None) -> None:
    for key, value in values.items():
        if not isinstance(key, str):
            raise ProtocolError(f"observation keys must be strings, got {key!r}")
        field = fields[key]
        if isinstance(value, Mapping):
            _fill(field.map.fields, value, jpeg_quality)
        elif isinstance(value, str):
            field.text = value
        elif isinstance(value, (bool, int, float)) and not isinstance(value, np.ndarray):
            field.number = float(value)
        else:
            array = np.asarray(value)
            if jpeg_quality is not None and array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3:
                from ..media import encode_jpeg

                field.jpeg = encode_jpeg(array, jpeg_quality)
            else:
                field.tensor.CopyFrom(array_to_tensor(array))


def proto_to_observation(message: pb.Observation) -> dict[str, Any]:
    """Decode an observation into the map the engine expects."""
    return _read(message.fields, "")


def _read(fields: Any, prefix: str) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    for name, field in fields.items():
        key = prefix + name
        kind = field.WhichOneof("kind")
        if kind == "map":
            obs[name] = _read(field.map.fields, key + ".")
        elif kind == "tensor":
            obs[name] = tensor_to_array(field.tensor, key)
        elif kind == "jpeg":
            from ..media import decode_jpeg

            try:
                obs[name] = decode_jpeg(field.jpeg)
            except Exception as exc:  # PIL / OpenCV raise many kinds
                raise ProtocolError(f"{key}: not a decodable JPEG image ({type(exc).__name__}: {exc})") from None
        elif kind == "text":
            obs[name] = field.text
        elif kind == "number":
            obs[name] = field.number
        else:
            raise ProtocolError(f"{key}: empty value (set tensor, jpeg, text, number or map)")
    return obs


def chunk_to_proto(reply: Mapping[str, Any], step: int = 0) -> pb.ActionChunk:
    timing = {key: float(value) for key, value in dict(reply.get("server_timing") or {}).items() if isinstance(value, (int, float))}
    return pb.ActionChunk(actions=array_to_tensor(np.asarray(reply["actions"], np.float32)), server_timing=timing, step=int(step))


def proto_to_reply(message: pb.ActionChunk) -> dict[str, Any]:
    """The reply map a WebSocket client would get: ``actions``, ``server_timing``, ``step``."""
    timing: dict[str, float] = dict(message.server_timing)
    return {"actions": tensor_to_array(message.actions, "actions"), "server_timing": timing, "step": message.step}


def frame_to_metadata(frame: Mapping[str, Any], session_id: str = "") -> pb.Metadata:
    """Encode the engine's metadata frame (ready or idle)."""
    if frame.get("status") == "idle" or "action_dim" not in frame:
        return pb.Metadata(status="idle", message=str(frame.get("message") or ""), session_id=session_id)
    features = {
        key: pb.FeatureSpec(shape=list(spec.get("shape") or ()), dtype=str(spec.get("dtype") or "float32"))
        for key, spec in dict(frame.get("input_features") or {}).items()
    }
    return pb.Metadata(
        status=str(frame.get("status") or "ready"),
        model_id=str(frame.get("model_id") or ""),
        policy_type=str(frame.get("policy_type") or ""),
        action_dim=int(frame["action_dim"]),
        horizon=int(frame["horizon"]),
        n_action_steps=int(frame.get("n_action_steps") or frame["horizon"]),
        fps=float(frame.get("fps") or 0.0),
        input_features=features,
        camera_names=list(frame.get("camera_names") or ()),
        description=str(frame.get("description") or ""),
        action_space=str(frame.get("action_space") or ""),
        session_id=session_id,
    )


def metadata_to_frame(message: pb.Metadata) -> dict[str, Any]:
    """Decode into the same map a WebSocket client receives as its first frame."""
    if message.status == "idle":
        return {"status": "idle", "model_id": None, "message": message.message}
    metadata = PolicyMetadata.from_dict({
        "model_id": message.model_id,
        "policy_type": message.policy_type,
        "action_dim": message.action_dim,
        "horizon": message.horizon,
        "n_action_steps": message.n_action_steps,
        "fps": message.fps,
        "input_features": {key: {"shape": list(spec.shape), "dtype": spec.dtype} for key, spec in message.input_features.items()},
        "camera_names": list(message.camera_names),
        "description": message.description,
        "action_space": message.action_space or "joint_position",
    })
    return {"status": message.status or "ready", **metadata.to_dict()}
