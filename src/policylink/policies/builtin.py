"""Built-in policies that need no checkpoint: for tests, demos and benchmarks.

Each one says what it is in its metadata (``policy_type`` and
``description``); none of them pretends to be a trained model.

- ``zeros`` / ``constant``: the same chunk every time.
- ``random``: seeded uniform noise in ``[-1, 1]``.
- ``flow`` (needs the ``server`` extra): a stochastic flow-matching policy
  that samples each chunk from noise, as VLAs do, with real-time-chunking
  guidance (:mod:`policylink.policies.flow`).
- ``replay``: plays a recorded action trajectory (a ``.npy`` / ``.npz`` file,
  or a built-in smooth sine trajectory), chunk by chunk. If the observation
  carries a ``step`` number, the chunk starts at that step, so a client that
  skips steps gets the actions that belong to the present.

All accept ``latency_ms`` to simulate a slow model (the delay is a sleep, so
many clients can be served at once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..action_space import ActionSpace
from ..types import Feature, Observation, Policy, PolicyMetadata, Reply

__all__ = [
    "BuiltinPolicy",
    "ConstantPolicy",
    "RandomPolicy",
    "ReplayPolicy",
    "BUILTIN_POLICIES",
    "make_builtin_policy",
    "sine_trajectory",
]


class BuiltinPolicy(Policy):
    """Shared plumbing: metadata from a few numbers, optional artificial latency."""

    policy_type = "builtin"
    description = ""
    thread_safe = True

    def __init__(
        self,
        action_dim: int = 6,
        horizon: int = 16,
        fps: float = 30.0,
        state_dim: int | None = None,
        cameras: Mapping[str, tuple[int, int]] | None = None,
        latency_ms: float = 0.0,
        n_action_steps: int | None = None,
        action_range: tuple[Any, Any] | None = None,
        control: ActionSpace = ActionSpace(),
    ) -> None:
        if action_dim <= 0 or horizon <= 0:
            raise ValueError(f"action_dim and horizon must be positive, got {action_dim} and {horizon}")
        self.action_dim = action_dim
        self.horizon = horizon
        self.latency_s = max(0.0, latency_ms) / 1000.0
        features = {"observation.state": Feature((state_dim or action_dim,), "float32")}
        for name, (height, width) in (cameras or {}).items():
            features[f"observation.images.{name}"] = Feature((height, width, 3), "uint8")
        self._metadata = PolicyMetadata(
            action_dim=action_dim,
            horizon=horizon,
            fps=fps,
            input_features=features,
            camera_names=tuple(cameras or {}),
            model_id=f"builtin/{self.policy_type}",
            policy_type=self.policy_type,
            n_action_steps=n_action_steps,
            description=self.description,
            # What this policy can return, announced like a checkpoint's action statistics.
            action_low=None if action_range is None else tuple(np.broadcast_to(np.asarray(action_range[0], np.float64), (action_dim,))),
            action_high=None if action_range is None else tuple(np.broadcast_to(np.asarray(action_range[1], np.float64), (action_dim,))),
            control=control,
        )

    @property
    def metadata(self) -> PolicyMetadata:
        return self._metadata

    def infer(self, obs: Observation) -> Reply:
        if self.latency_s:
            time.sleep(self.latency_s)
        return {"actions": self._chunk(obs)}

    def _chunk(self, obs: Observation) -> np.ndarray:
        raise NotImplementedError


class ConstantPolicy(BuiltinPolicy):
    """Returns the same chunk every call: ``value`` in every entry (0 for ``zeros``)."""

    policy_type = "constant"
    description = "built-in constant policy: every action is the same value; not a trained model"

    def __init__(self, value: float = 0.0, **kwargs: Any) -> None:
        super().__init__(action_range=(value, value), **kwargs)
        self._actions = np.full((self.horizon, self.action_dim), value, dtype=np.float32)

    def _chunk(self, obs: Observation) -> np.ndarray:
        return self._actions.copy()


class RandomPolicy(BuiltinPolicy):
    """Uniform noise in ``[-1, 1]`` from a seeded generator."""

    policy_type = "random"
    description = "built-in random policy: seeded uniform noise in [-1, 1]; not a trained model"

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(action_range=(-1.0, 1.0), **kwargs)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def _chunk(self, obs: Observation) -> np.ndarray:
        with self._lock:
            return self._rng.uniform(-1.0, 1.0, (self.horizon, self.action_dim)).astype(np.float32)

    def reset(self) -> None:
        with self._lock:
            self._rng = np.random.default_rng(self._seed)


def sine_trajectory(length: int, action_dim: int, fps: float = 30.0) -> np.ndarray:
    """A smooth reference trajectory: one slow sine per joint, phases spread out."""
    t = np.arange(length, dtype=np.float64)[:, None] / fps
    joints = np.arange(action_dim, dtype=np.float64)[None, :]
    period_s = 4.0 + joints  # every joint moves at its own slow pace
    return (0.5 * np.sin(2 * np.pi * t / period_s + joints)).astype(np.float32)


class ReplayPolicy(BuiltinPolicy):
    """Replays recorded actions chunk by chunk (looping at the end)."""

    policy_type = "replay"
    description = "built-in replay policy: plays back a recorded action trajectory; not a trained model"

    def __init__(self, actions: np.ndarray | str | Path | None = None, **kwargs: Any) -> None:
        trajectory = _load_trajectory(actions, kwargs.get("action_dim", 6), kwargs.get("fps", 30.0))
        kwargs["action_dim"] = trajectory.shape[1]
        super().__init__(action_range=(trajectory.min(axis=0), trajectory.max(axis=0)), **kwargs)
        self.trajectory = trajectory
        self._next_step = 0
        self._lock = threading.Lock()

    def session(self) -> ReplayPolicy:
        # Each client replays from its own position.
        clone = object.__new__(ReplayPolicy)
        clone.__dict__.update(self.__dict__)
        clone._next_step = 0
        clone._lock = threading.Lock()
        return clone

    def _chunk(self, obs: Observation) -> np.ndarray:
        with self._lock:
            start = chunk_start(self, obs, self.horizon)
        index = np.arange(start, start + self.horizon) % len(self.trajectory)
        return self.trajectory[index].copy()

    def reset(self) -> None:
        with self._lock:
            self._next_step = 0


def chunk_start(position: Any, obs: Observation, horizon: int) -> int:
    """Where a chunk starts: the observation's ``step`` if it has one, else where ``position``'s last chunk ended.

    ``position`` (a client's policy object) keeps ``_next_step``, moved to the end of this chunk.
    """
    start = _step_of(obs)
    if start is None:
        start = position._next_step
    position._next_step = start + horizon
    return start


def _step_of(obs: Observation) -> int | None:
    step = obs.get("step") if isinstance(obs, Mapping) else None
    if step is None:
        return None
    try:
        return int(np.asarray(step).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None


def _load_trajectory(actions: np.ndarray | str | Path | None, action_dim: int, fps: float) -> np.ndarray:
    if actions is None:
        return sine_trajectory(600, action_dim, fps)
    if isinstance(actions, (str, Path)):
        loaded = np.load(actions)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            if "actions" not in loaded and "action" not in loaded:
                raise ValueError(f"{actions}: .npz file has no 'actions' array (found {sorted(loaded.files)})")
            actions = loaded["actions"] if "actions" in loaded else loaded["action"]
        else:
            actions = loaded
    trajectory = np.asarray(actions, dtype=np.float32)
    if trajectory.ndim != 2 or len(trajectory) == 0:
        raise ValueError(f"a replay trajectory must be (steps, action_dim), got shape {trajectory.shape}")
    return trajectory


#: The flow policy's default chunk length: about 1.7 s at 30 Hz, like SmolVLA's and pi0's 50-step chunks.
FLOW_HORIZON = 50

BUILTIN_POLICIES: dict[str, type[BuiltinPolicy] | None] = {
    "zeros": ConstantPolicy,
    "constant": ConstantPolicy,
    "random": RandomPolicy,
    "replay": ReplayPolicy,
    "flow": None,  # FlowPolicy needs torch and lerobot: imported when asked for
}


def make_builtin_policy(name: str, **kwargs: Any) -> BuiltinPolicy:
    """Build a built-in policy by name (``zeros``, ``constant``, ``random``, ``replay``, ``flow``)."""
    if name not in BUILTIN_POLICIES:
        raise ValueError(f"unknown built-in policy {name!r}; choose one of {sorted(BUILTIN_POLICIES)}")
    cls = BUILTIN_POLICIES[name] or _server_builtin(name)
    if name == "zeros":
        kwargs["value"] = 0.0
    return cls(**kwargs)


def _server_builtin(name: str) -> type[BuiltinPolicy]:
    try:
        from .flow import FlowPolicy
    except ImportError as exc:
        raise ImportError(f"the built-in {name!r} policy needs torch and lerobot: pip install 'policylink[server]' ({exc})") from None
    return FlowPolicy
