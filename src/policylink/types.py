"""Core types shared by the client and the server.

An *observation* is a nested ``dict`` whose leaves are numpy arrays, strings
or numbers. A *reply* is a ``dict`` with at least ``"actions"``: the action
chunk, a ``(horizon, action_dim)`` float32 array; it may carry extra fields
(``server_timing``, policy-specific outputs).

A :class:`Policy` turns one observation into one reply. The server announces
a :class:`PolicyMetadata` to every client when it connects.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from .action_space import ActionSpace
from .rtc.request import RTCSupport

__all__ = [
    "Observation",
    "Reply",
    "Feature",
    "PolicyMetadata",
    "Policy",
    "as_action_chunk",
]

#: A nested mapping of numpy arrays, strings and numbers.
Observation = dict[str, Any]
#: What a policy returns: ``{"actions": (horizon, action_dim) float32, ...}``.
Reply = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Feature:
    """One input the policy reads: its shape and dtype as the client sends it."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feature:
        return cls(shape=tuple(int(n) for n in data["shape"]), dtype=str(data.get("dtype", "float32")))


@dataclasses.dataclass(frozen=True)
class PolicyMetadata:
    """What a server tells every client about the policy it serves.

    ``input_features`` maps observation keys (LeRobot style, e.g.
    ``observation.state``, ``observation.images.front``) to their
    :class:`Feature`. Cameras are the image features; ``camera_names`` lists
    their short names (``front`` for ``observation.images.front``).
    """

    action_dim: int
    horizon: int
    fps: float = 30.0
    input_features: Mapping[str, Feature] = dataclasses.field(default_factory=dict)
    camera_names: tuple[str, ...] = ()
    model_id: str = "unknown"
    policy_type: str = "unknown"
    #: Steps of each chunk the policy itself would execute before asking again.
    n_action_steps: int | None = None
    #: ``joint_position`` or ``joint_velocity``, as RoboArena-style clients expect.
    action_space: str = "joint_position"
    #: What the actions mean (``joint``/``ee``, ``abs``/``relative``/``delta``); clients turn non-absolute chunks into commands.
    control: ActionSpace = ActionSpace()
    #: Free-form, honest notes about the policy (e.g. "random weights").
    description: str = ""
    #: Per-joint range of the actions the policy was trained on (the checkpoint's statistics), when known.
    #: Clients refuse chunks outside it (with a margin) unless told otherwise.
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None
    #: Whether (and with which defaults) the policy steers chunks with real-time-chunking fields; ``None``: it ignores them.
    rtc: RTCSupport | None = None

    def __post_init__(self) -> None:
        self.control.check_dims(self.action_dim)
        if (self.action_low is None) != (self.action_high is None):
            raise ValueError("action bounds need both action_low and action_high")
        if self.action_low is not None and self.action_high is not None:
            low, high = tuple(float(v) for v in self.action_low), tuple(float(v) for v in self.action_high)
            if len(low) != self.action_dim or len(high) != self.action_dim:
                raise ValueError(f"action bounds must have {self.action_dim} values each, got {len(low)} and {len(high)}")
            if any(lo > hi for lo, hi in zip(low, high)):
                raise ValueError("action bounds need action_low <= action_high")
            object.__setattr__(self, "action_low", low)
            object.__setattr__(self, "action_high", high)

    @property
    def image_resolution(self) -> tuple[int, int] | None:
        """(height, width) of the first camera input, if any."""
        for name in self._camera_keys():
            shape = self.input_features[name].shape
            # Features are HxWxC for uint8 images, CxHxW for float images.
            return (shape[0], shape[1]) if shape[-1] in (1, 3) else (shape[-2], shape[-1])
        return None

    def _camera_keys(self) -> list[str]:
        return [key for key in self.input_features if _is_image_key(key)]

    def to_dict(self) -> dict[str, Any]:
        """The metadata frame sent on connect (plain msgpack-able types)."""
        wrist = [name for name in self.camera_names if "wrist" in name]
        resolution = self.image_resolution
        return {
            "model_id": self.model_id,
            "policy_type": self.policy_type,
            "action_dim": self.action_dim,
            "horizon": self.horizon,
            "n_action_steps": self.n_action_steps if self.n_action_steps is not None else self.horizon,
            "fps": float(self.fps),
            "input_features": {key: feat.to_dict() for key, feat in self.input_features.items()},
            "camera_names": list(self.camera_names),
            "description": self.description,
            # Fields read by RoboArena-style clients.
            "image_resolution": list(resolution) if resolution else None,
            "n_external_cameras": len(self.camera_names) - len(wrist),
            "needs_wrist_camera": bool(wrist),
            "action_space": self.action_space,
            **self.control.to_dict(),
            "action_low": list(self.action_low) if self.action_low is not None else None,
            "action_high": list(self.action_high) if self.action_high is not None else None,
            "rtc": self.rtc.to_dict() if self.rtc is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyMetadata:
        """Parse a metadata frame; raises ``KeyError``/``ValueError`` if malformed."""
        features = {key: Feature.from_dict(value) for key, value in dict(data.get("input_features") or {}).items()}
        return cls(
            action_dim=int(data["action_dim"]),
            horizon=int(data["horizon"]),
            fps=float(data.get("fps", 30.0)),
            input_features=features,
            camera_names=tuple(data.get("camera_names") or ()),
            model_id=str(data.get("model_id", "unknown")),
            policy_type=str(data.get("policy_type", "unknown")),
            n_action_steps=data.get("n_action_steps"),
            action_space=str(data.get("action_space", "joint_position")),
            control=ActionSpace.from_dict(data),
            description=str(data.get("description", "")),
            action_low=_bounds(data.get("action_low")),
            action_high=_bounds(data.get("action_high")),
            rtc=RTCSupport.from_dict(data.get("rtc")),
        )


def _bounds(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _is_image_key(key: str) -> bool:
    return ".images." in key or key.startswith("observation.image") or "/image" in key


class Policy(abc.ABC):
    """What the server serves: one observation in, one reply with ``actions`` out.

    Implementations must return the whole chunk in one call. ``infer`` may be
    called from a worker thread, never concurrently on the same session
    object unless :attr:`thread_safe` is true.
    """

    #: Whether ``infer`` may run concurrently on one object (stateless policies).
    thread_safe: bool = False

    @property
    @abc.abstractmethod
    def metadata(self) -> PolicyMetadata:
        """The metadata announced to clients."""

    @abc.abstractmethod
    def infer(self, obs: Observation) -> Reply:
        """Return ``{"actions": (horizon, action_dim) float32, ...}`` for ``obs``."""

    def reset(self) -> None:
        """Forget per-episode state (observation history, queued actions)."""

    def session(self) -> Policy:
        """A policy object for one client: shares weights, owns per-client state.

        Stateless policies return ``self``.
        """
        return self

    def close(self) -> None:
        """Release resources (GPU memory, files) held by this policy."""

    # -- batching across clients (optional) --------------------------------

    def batch_key(self, obs: Observation) -> Hashable | None:
        """Requests with equal keys may share one forward pass; ``None`` never batches.

        Called on the served (root) policy. A policy that supports batching
        returns something like the tuple of its input shapes.
        """
        return None

    def infer_batch(self, sessions: Sequence[Policy], observations: Sequence[Observation]) -> list[Reply]:
        """Answer several clients at once: ``observations[i]`` comes from ``sessions[i]``.

        Called on the served (root) policy with the per-client session objects,
        whose per-client state must be used and updated as ``infer`` would.
        The default runs them one by one.
        """
        return [session.infer(obs) for session, obs in zip(sessions, observations)]

    def prepare(self, session: Policy, obs: Observation) -> Any:
        """The host-side work for one request of a batch, done before the batch runs (optional).

        The batch scheduler calls it on a preparation thread as soon as a
        request arrives, so this work (mapping, resizing, normalising,
        tokenising, copies to the device) overlaps the forward pass of the
        batch before. It must not touch per-client state: that belongs to
        :meth:`infer_prepared`, which runs batches one at a time. The default
        hands the observation on unchanged.
        """
        return obs

    def infer_prepared(self, sessions: Sequence[Policy], prepared: Sequence[Any]) -> list[Reply]:
        """:meth:`infer_batch` on what :meth:`prepare` returned for each request (default: ``infer_batch``)."""
        return self.infer_batch(sessions, prepared)


def as_action_chunk(actions: Any, action_dim: int | None = None) -> np.ndarray:
    """Check and convert ``actions`` to a C-contiguous ``(horizon, action_dim)`` float32 array.

    Raises ``ValueError`` naming the problem when the shape is wrong.
    """
    chunk = np.asarray(actions, dtype=np.float32)
    if chunk.ndim == 1:
        chunk = chunk[None, :]
    if chunk.ndim != 2:
        raise ValueError(f"actions must be (horizon, action_dim), got shape {chunk.shape}")
    if action_dim is not None and chunk.shape[1] != action_dim:
        raise ValueError(f"actions have {chunk.shape[1]} values per step, expected {action_dim}")
    return np.ascontiguousarray(chunk)
