"""Between policylink's Python values and the typed ``policylink.v1`` messages.

Shared by the gRPC server and client. Arrays become :class:`Tensor`
messages (numpy dtype string, shape, C-order bytes); object, void and
complex dtypes are refused, as in the msgpack codec. Decoding checks that
the bytes match the shape and dtype, so a malformed tensor gets an error
that names it instead of a crash inside the policy.

Received bytes are decoded within a :class:`~policylink.limits.DecodeLimits`:
:func:`parse_message` (and :func:`observation_message`,
:func:`observation_from_bytes`) first walk the wire format with
:func:`~policylink.proto.wire_limits.check_wire`, so a message that would
parse into millions of values is refused before the protobuf parser builds
it; :func:`proto_to_observation` then bounds the nesting of values, the
dimensions of tensors and the pixels of ``jpeg`` images (read from the
image header before decoding).

The real-time-chunking fields and the noise seed, which the msgpack
protocols carry in the observation map under ``"__rtc__"`` and
``"__seed__"`` (:mod:`policylink.rtc.request`), travel in the typed
``Observation.rtc`` and ``Observation.seed`` fields; decoding puts them back
under those keys, so the engine checks them as for every other protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ..action_space import ActionSpace
from ..codec import checked_array, checked_dtype, refuse_unsendable
from ..errors import ProtocolError, RequestError
from ..limits import DEFAULT_LIMITS, DecodeLimits
from ..rtc.request import RTC_KEY, SCHEDULES, SEED_KEY, RTCRequest, RTCSupport, parse_seed
from ..types import PolicyMetadata
from .v1 import policylink_pb2 as pb
from .wire_limits import WireFormatError, check_wire

__all__ = [
    "array_to_tensor",
    "tensor_to_array",
    "observation_to_proto",
    "proto_to_observation",
    "parse_message",
    "observation_message",
    "observation_from_bytes",
    "chunk_to_proto",
    "proto_to_reply",
    "frame_to_metadata",
    "metadata_to_frame",
]

#: What the ``jpeg`` field of a ``Value`` may hold (the schema says JPEG).
JPEG_FIELD_FORMATS = ("JPEG",)


def array_to_tensor(array: Any) -> pb.Tensor:
    array = np.asarray(array)
    refuse_unsendable(array)
    return pb.Tensor(dtype=array.dtype.str, shape=array.shape, data=np.ascontiguousarray(array).tobytes())


def tensor_to_array(tensor: pb.Tensor, name: str = "tensor", limits: DecodeLimits | None = None) -> np.ndarray:
    """Rebuild an array; raises :class:`ProtocolError` naming ``name`` when it is malformed or breaks ``limits``."""
    if limits is None:
        limits = DEFAULT_LIMITS
    dtype = checked_dtype(tensor.dtype, name)
    ndim = len(tensor.shape)  # counted before the shape becomes Python integers
    if ndim > limits.max_ndim:
        raise ProtocolError(f"{name}: shape has {ndim} dimensions (limit max_ndim={limits.max_ndim})")
    data = tensor.data  # each access copies the bytes out of the message: read once
    return checked_array(data, dtype, tuple(tensor.shape), name, limits)


def observation_to_proto(obs: Mapping[str, Any], step: int = 0, jpeg_quality: int | None = None) -> pb.Observation:
    """Encode an observation; with ``jpeg_quality``, HxWx3 uint8 frames travel as JPEG.

    ``obs["__rtc__"]`` (a map as in :meth:`RTCRequest.to_wire`, or an
    :class:`RTCRequest`) goes into ``Observation.rtc`` and ``obs["__seed__"]``
    into ``Observation.seed`` (``None`` for either: not sent). Values the
    typed fields cannot hold (a missing ``delay``, a fractional
    ``execution_horizon``, an explicit ``guidance`` of 0, a negative seed, an
    unknown field) raise :class:`RequestError` naming the field, as the
    server would; the rest (a negative delay, a prefix of the wrong width)
    is the server's to check.
    """
    message = pb.Observation(step=int(step))
    if RTC_KEY in obs or SEED_KEY in obs:
        rtc, seed = obs.get(RTC_KEY), obs.get(SEED_KEY)
        obs = {key: value for key, value in obs.items() if key != RTC_KEY and key != SEED_KEY}
        if rtc is not None:
            _fill_rtc(message.rtc, rtc)
        if seed is not None:
            message.seed = parse_seed(seed)
    _fill(message.fields, obs, jpeg_quality)
    return message


#: The fields of ``"__rtc__"``: the first two are required.
_RTC_FIELDS = ("prefix", "delay", "execution_horizon", "guidance", "schedule")
_INT32 = (-(2**31), 2**31)


def _fill_rtc(target: pb.RealTimeChunking, value: Any) -> None:
    """Write the ``"__rtc__"`` map into ``Observation.rtc`` (see :func:`observation_to_proto`)."""
    if isinstance(value, RTCRequest):
        value = value.to_wire()
    if not isinstance(value, Mapping):
        raise RequestError(f"'{RTC_KEY}' must be a map with prefix and delay (and optionally execution_horizon), got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if key not in _RTC_FIELDS)
    if unknown:
        raise RequestError(f"'{RTC_KEY}' has unknown field(s) {unknown[:5]}; allowed: {', '.join(_RTC_FIELDS)}")
    for name in _RTC_FIELDS[:2]:
        if value.get(name) is None:
            raise RequestError(f"'{RTC_KEY}' needs '{name}'")
    target.prefix.CopyFrom(array_to_tensor(value["prefix"]))
    for name in ("delay", "execution_horizon"):
        number = value.get(name)
        if number is None:  # execution_horizon left out: 0 on the wire, the server's default
            continue
        if name == "execution_horizon" and isinstance(number, (int, np.integer)) and not isinstance(number, bool) and number < 1:
            # 0 on the wire means "the server's default": an explicit 0 would silently become it.
            raise RequestError(f"'{RTC_KEY}.execution_horizon' must be a whole number >= 1, got '{int(number)}'")
        if isinstance(number, np.integer):
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int) or not _INT32[0] <= number < _INT32[1]:
            raise RequestError(f"'{RTC_KEY}.{name}' must be a whole number (a 32-bit integer on gRPC), got {str(number)!r:.50}")
        setattr(target, name, number)
    guidance = value.get("guidance")
    if guidance is not None:
        # 0 on the wire means "the server's default": an explicit 0 would silently become it.
        if isinstance(guidance, (bool, np.bool_)) or not isinstance(guidance, (int, float, np.integer, np.floating)) or guidance == 0:
            raise RequestError(f"'{RTC_KEY}.guidance' must be a number > 0, got {guidance!r:.50}")
        target.guidance = float(guidance)
    schedule = value.get("schedule")
    if schedule is not None:
        if not isinstance(schedule, str) or not schedule:
            raise RequestError(f"'{RTC_KEY}.schedule' must be one of {list(SCHEDULES)}, got {str(schedule)!r:.50}")
        target.schedule = schedule


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


def proto_to_observation(message: pb.Observation, limits: DecodeLimits | None = None) -> dict[str, Any]:
    """Decode an observation into the map the engine expects.

    Refuses (:class:`ProtocolError` naming the field and the limit) values
    nested deeper than ``limits.max_depth`` maps, more than
    ``limits.max_elements`` fields in all, tensors of more than
    ``limits.max_ndim`` dimensions, and ``jpeg`` images that are not JPEG or
    whose header claims more than ``limits.max_image_pixels`` pixels.
    """
    if limits is None:
        limits = DEFAULT_LIMITS
    obs = _read(message.fields, "", limits, 1, [0])
    for key, field in ((RTC_KEY, "rtc"), (SEED_KEY, "seed")):
        if key in obs:
            raise ProtocolError(f"'{key}' travels in the Observation.{field} field over gRPC, not in fields")
    if message.HasField("rtc"):
        obs[RTC_KEY] = _read_rtc(message.rtc, limits)
    if message.HasField("seed"):
        obs[SEED_KEY] = message.seed  # the engine refuses seeds past 2**63 - 1, naming the field
    return obs


def _read_rtc(message: pb.RealTimeChunking, limits: DecodeLimits) -> dict[str, Any]:
    """``Observation.rtc`` as the ``"__rtc__"`` map (the engine checks it): guidance 0 and schedule "" are left out."""
    rtc: dict[str, Any] = {}
    if message.HasField("prefix"):  # else the engine names the missing field
        rtc["prefix"] = tensor_to_array(message.prefix, f"{RTC_KEY}.prefix", limits)
    rtc["delay"] = message.delay
    if message.execution_horizon:
        rtc["execution_horizon"] = message.execution_horizon
    if message.guidance:
        rtc["guidance"] = message.guidance
    if message.schedule:
        rtc["schedule"] = message.schedule
    return rtc


def _read(fields: Any, prefix: str, limits: DecodeLimits, depth: int, count: list[int]) -> dict[str, Any]:
    if depth > limits.max_depth:
        raise ProtocolError(f"{prefix[:-1]}: values nest deeper than {limits.max_depth} levels (limit max_depth={limits.max_depth})")
    count[0] += len(fields)
    if count[0] > limits.max_elements:
        raise ProtocolError(f"observation has more than {limits.max_elements} fields (limit max_elements={limits.max_elements})")
    obs: dict[str, Any] = {}
    for name, field in fields.items():
        key = prefix + name
        kind = field.WhichOneof("kind")
        if kind == "map":
            obs[name] = _read(field.map.fields, key + ".", limits, depth + 1, count)
        elif kind == "tensor":
            obs[name] = tensor_to_array(field.tensor, key, limits)
        elif kind == "jpeg":
            obs[name] = _decode_jpeg_field(field.jpeg, key, limits)
        elif kind == "text":
            obs[name] = field.text
        elif kind == "number":
            obs[name] = field.number
        else:
            raise ProtocolError(f"{key}: empty value (set tensor, jpeg, text, number or map)")
    return obs


def _decode_jpeg_field(data: bytes, key: str, limits: DecodeLimits) -> np.ndarray:
    from ..media import ImageDecodeError, ImageTooLarge, decode_image

    try:
        return decode_image(data, limits.max_image_pixels, JPEG_FIELD_FORMATS)
    except ImageTooLarge as exc:
        raise ProtocolError(f"{key}: {exc} (max_image_pixels)") from None
    except ImageDecodeError as exc:
        message = str(exc)
        if not message.startswith("not a decodable"):
            message = f"not a decodable JPEG image ({message})"
        raise ProtocolError(f"{key}: {message}") from None
    except Exception as exc:  # PIL / OpenCV raise many kinds; ImportError without either
        raise ProtocolError(f"{key}: not a decodable JPEG image ({type(exc).__name__}: {exc})") from None


def parse_message(data: bytes, message_class: Any, limits: DecodeLimits | None = None) -> Any:
    """Parse received bytes into ``message_class`` after checking their wire format against ``limits``.

    Raises :class:`ProtocolError`: naming the limit a message breaks, or
    "request is not a valid <type> protobuf message (...)" for bytes that are
    not a well-formed message of that type.
    """
    if limits is None:
        limits = DEFAULT_LIMITS
    type_name = message_class.DESCRIPTOR.full_name
    try:
        check_wire(data, message_class.DESCRIPTOR, limits)
    except WireFormatError as exc:
        raise ProtocolError(f"request is {exc}") from None
    try:
        return message_class.FromString(bytes(data) if isinstance(data, memoryview) else data)
    except DecodeError as exc:
        raise ProtocolError(f"request is not a valid {type_name} protobuf message ({exc})") from None


def observation_message(data: bytes, limits: DecodeLimits | None = None) -> pb.Observation:
    """The parsed :class:`Observation` of received bytes (checked as :func:`parse_message` does)."""
    return parse_message(data, pb.Observation, limits)


def observation_from_bytes(data: bytes, limits: DecodeLimits | None = None) -> dict[str, Any]:
    """Check, parse and decode a received ``Observation`` into the map the engine expects."""
    if limits is None:
        limits = DEFAULT_LIMITS
    return proto_to_observation(observation_message(data, limits), limits)


def chunk_to_proto(reply: Mapping[str, Any], step: int = 0) -> pb.ActionChunk:
    timing = {key: float(value) for key, value in dict(reply.get("server_timing") or {}).items() if isinstance(value, (int, float))}
    return pb.ActionChunk(actions=array_to_tensor(np.asarray(reply["actions"], np.float32)), server_timing=timing, step=int(step))


def proto_to_reply(message: pb.ActionChunk, limits: DecodeLimits | None = None) -> dict[str, Any]:
    """The reply map a WebSocket client would get: ``actions``, ``server_timing``, ``step``."""
    timing: dict[str, float] = dict(message.server_timing)
    return {"actions": tensor_to_array(message.actions, "actions", limits), "server_timing": timing, "step": message.step}


def frame_to_metadata(frame: Mapping[str, Any], session_id: str = "") -> pb.Metadata:
    """Encode the engine's metadata frame (ready or idle)."""
    limit = int(frame.get("max_message_bytes") or 0)
    if frame.get("status") == "idle" or "action_dim" not in frame:
        return pb.Metadata(status="idle", message=str(frame.get("message") or ""), session_id=session_id, max_message_bytes=limit)
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
        max_message_bytes=limit,
        action_low=list(frame.get("action_low") or ()),
        action_high=list(frame.get("action_high") or ()),
        rtc=_support_to_proto(frame.get("rtc")),
        control=_control_to_proto(frame),
    )


def _control_to_proto(frame: dict[str, Any]) -> pb.ActionSpace:
    space = ActionSpace.from_dict(frame)
    return pb.ActionSpace(ctrl_space=space.ctrl_space, ctrl_type=space.ctrl_type,
                          absolute_dims=list(space.absolute_dims), gripper_continuous=space.gripper_continuous)


def _control_from_proto(message: pb.Metadata) -> dict[str, Any]:
    """``Metadata.control`` as the frame's fields (absent: joint/abs)."""
    control = message.control
    return ActionSpace(control.ctrl_space or "joint", control.ctrl_type or "abs", tuple(control.absolute_dims),
                       control.gripper_continuous).to_dict()


def _support_to_proto(support: Any) -> pb.RealTimeChunkingSupport | None:
    """The frame's ``rtc`` (a map, an :class:`RTCSupport` or ``None``) as a message (``None``: the field stays unset)."""
    if support is None:
        return None
    if isinstance(support, RTCSupport):
        support = support.to_dict()
    return pb.RealTimeChunkingSupport(
        guidance=float(support.get("guidance") or 0.0), max_guidance=float(support.get("max_guidance") or 0.0),
        schedule=str(support.get("schedule") or ""), execution_horizon=int(support.get("execution_horizon") or 0),
    )


def _support_from_proto(message: pb.Metadata) -> dict[str, Any] | None:
    """``Metadata.rtc`` as the frame's ``rtc`` map; fields left at 0 / empty take :class:`RTCSupport`'s defaults."""
    if not message.HasField("rtc"):
        return None
    support = message.rtc
    values = {"guidance": support.guidance, "max_guidance": support.max_guidance,
              "schedule": support.schedule, "execution_horizon": support.execution_horizon}
    return {**RTCSupport().to_dict(), **{key: value for key, value in values.items() if value}}


def metadata_to_frame(message: pb.Metadata) -> dict[str, Any]:
    """Decode into the same map a WebSocket client receives as its first frame."""
    server = {"protocol": "policylink.v1", "max_message_bytes": message.max_message_bytes or None}
    if message.status == "idle":
        return {"status": "idle", "model_id": None, "message": message.message, **server}
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
        "action_low": list(message.action_low) or None,
        "action_high": list(message.action_high) or None,
        "rtc": _support_from_proto(message),
        **_control_from_proto(message),
    })
    return {"status": message.status or "ready", **metadata.to_dict(), **server}
