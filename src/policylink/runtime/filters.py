"""Safety filters applied to every action on the robot side, and chunk validation.

A filter sees one action per control tick and returns the action to send.
Filters keep state across ticks (a window, the previous command), so the
executor calls :meth:`ActionFilter.reset` with the robot's state at the start
of every episode. :class:`FilterChain` applies filters in the order given, so
the order is a decision: e.g. map 16 -> 22 first, then clip to the robot's
joint limits, then limit the velocity.

:class:`ReadyPose` is not a per-tick filter: the executor plays its ramp
before the first policy action of each episode. :class:`ChunkValidator`
checks a whole chunk before it is queued; a rejected chunk is never executed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

__all__ = [
    "ActionFilter",
    "FilterChain",
    "MovingAverage",
    "VelocityLimit",
    "JointLimits",
    "GripperBinarize",
    "ActionMapping",
    "ReadyPose",
    "ChunkValidator",
    "ChunkRejected",
]


class ActionFilter(Protocol):
    """Turns the policy's action for this tick into the command sent to the robot."""

    def reset(self, state: np.ndarray | None) -> None:
        """Start of an episode; ``state`` is the robot's current joint state, if known."""
        ...

    def __call__(self, action: np.ndarray) -> np.ndarray: ...


class FilterChain:
    """Applies filters in order; an empty chain passes actions through.

    Filters before an :class:`ActionMapping` work in the policy's action space
    and are reset with the robot state's joints that the policy drives;
    filters after it work in the robot's space and get the whole state.
    """

    def __init__(self, filters: Iterable[ActionFilter] = ()) -> None:
        self.filters = list(filters)

    def reset(self, state: np.ndarray | None) -> None:
        mapping = next((f for f in self.filters if isinstance(f, ActionMapping)), None)
        for action_filter in self.filters:
            if mapping is not None and action_filter is not mapping and self.filters.index(action_filter) < self.filters.index(mapping):
                action_filter.reset(mapping.policy_part(state))
            else:
                action_filter.reset(state)

    def after(self, action_filter: ActionFilter) -> FilterChain:
        """The filters that follow ``action_filter`` (e.g. those that act in the robot's space after a mapping)."""
        return FilterChain(self.filters[self.filters.index(action_filter) + 1:])

    def __call__(self, action: np.ndarray) -> np.ndarray:
        for action_filter in self.filters:
            action = action_filter(action)
        return action

    def __len__(self) -> int:
        return len(self.filters)

    def __repr__(self) -> str:
        return f"FilterChain({self.filters!r})"


class MovingAverage:
    """Mean of the last ``window`` actions (fewer right after a reset)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"moving-average window must be at least 1, got {window}")
        self.window = window
        self._recent: collections.deque[np.ndarray] = collections.deque(maxlen=window)

    def reset(self, state: np.ndarray | None) -> None:
        self._recent.clear()

    def __call__(self, action: np.ndarray) -> np.ndarray:
        self._recent.append(np.asarray(action, dtype=np.float32))
        return np.mean(self._recent, axis=0).astype(np.float32)

    def __repr__(self) -> str:
        return f"MovingAverage(window={self.window})"


class VelocityLimit:
    """No joint moves more than ``max_delta`` (scalar or per joint) from one command to the next.

    The first command of an episode is limited against the robot's state when
    ``reset`` was given one; otherwise it passes unchanged.
    """

    def __init__(self, max_delta: float | Sequence[float] | np.ndarray) -> None:
        self.max_delta = np.asarray(max_delta, dtype=np.float32)
        if np.any(self.max_delta <= 0) or not np.all(np.isfinite(self.max_delta)):
            raise ValueError(f"max_delta must be positive and finite, got {max_delta}")
        self._previous: np.ndarray | None = None

    def reset(self, state: np.ndarray | None) -> None:
        self._previous = None if state is None else np.asarray(state, dtype=np.float32).copy()

    def __call__(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float32)
        if self._previous is not None and self._previous.shape == action.shape:
            action = self._previous + np.clip(action - self._previous, -self.max_delta, self.max_delta)
        self._previous = action.copy()
        return action

    def __repr__(self) -> str:
        return f"VelocityLimit(max_delta={self.max_delta.tolist()})"


class JointLimits:
    """Clips every joint into ``[low, high]`` (scalars or per joint)."""

    def __init__(self, low: float | Sequence[float] | np.ndarray, high: float | Sequence[float] | np.ndarray) -> None:
        self.low = np.asarray(low, dtype=np.float32)
        self.high = np.asarray(high, dtype=np.float32)
        if np.any(self.low > self.high):
            raise ValueError(f"joint limits need low <= high, got low={self.low.tolist()} high={self.high.tolist()}")

    def reset(self, state: np.ndarray | None) -> None:
        pass

    def __call__(self, action: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(action, dtype=np.float32), self.low, self.high)

    def contains(self, actions: np.ndarray) -> np.ndarray:
        """Boolean mask of the entries of ``actions`` that are within the limits."""
        return (actions >= self.low) & (actions <= self.high)

    def __repr__(self) -> str:
        return f"JointLimits(low={self.low.tolist()}, high={self.high.tolist()})"


class GripperBinarize:
    """Gripper joints become ``closed`` when above ``threshold``, else ``opened``."""

    def __init__(self, indices: Sequence[int], threshold: float = 0.5, opened: float = 0.0, closed: float = 1.0) -> None:
        self.indices = list(indices)
        if not self.indices:
            raise ValueError("gripper binarisation needs at least one joint index")
        self.threshold, self.opened, self.closed = float(threshold), float(opened), float(closed)

    def reset(self, state: np.ndarray | None) -> None:
        pass

    def __call__(self, action: np.ndarray) -> np.ndarray:
        action = np.array(action, dtype=np.float32)
        grip = action[self.indices]
        action[self.indices] = np.where(grip > self.threshold, self.closed, self.opened)
        return action

    def __repr__(self) -> str:
        return f"GripperBinarize(indices={self.indices}, threshold={self.threshold})"


class ActionMapping:
    """Places the policy's action into a larger robot vector, holding the other joints.

    ``indices[i]`` is the robot joint that policy value ``i`` drives. Every
    other joint holds ``defaults`` where given (a configured pose), or the
    value ``hold`` gives it, else its value from the robot state at reset (its
    last position), else 0.

    >>> mapping = ActionMapping(robot_dim=22, indices=range(16), hold={16: 0.0})   # 16 -> 22, joint 16 at 0
    """

    def __init__(
        self, robot_dim: int, indices: Iterable[int], defaults: Sequence[float] | np.ndarray | None = None, hold: dict[int, float] | None = None,
    ) -> None:
        self.robot_dim = robot_dim
        self.indices = np.asarray(list(indices), dtype=np.intp)
        if len(set(self.indices.tolist())) != len(self.indices):
            raise ValueError("action mapping indices must be distinct")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= robot_dim):
            raise ValueError(f"action mapping indices must be in [0, {robot_dim}), got {self.indices.tolist()}")
        self.defaults = None if defaults is None else np.asarray(defaults, dtype=np.float32)
        if self.defaults is not None and self.defaults.shape != (robot_dim,):
            raise ValueError(f"defaults must have {robot_dim} values, got {self.defaults.shape}")
        self.hold = {int(joint): float(value) for joint, value in (hold or {}).items()}
        driven = set(self.indices.tolist())
        for joint in self.hold:
            if not 0 <= joint < robot_dim or joint in driven:
                raise ValueError(f"held joint {joint} must be a robot joint in [0, {robot_dim}) that the policy does not drive")
        self._held = np.zeros(robot_dim, np.float32) if self.defaults is None else self.defaults.copy()
        self._apply_holds()

    def _apply_holds(self) -> None:
        for joint, value in self.hold.items():
            self._held[joint] = value

    def policy_part(self, state: np.ndarray | None) -> np.ndarray | None:
        """The joints of a robot ``state`` that the policy drives, in the policy's order (``None`` if unknown)."""
        if state is None or np.shape(state) != (self.robot_dim,):
            return None
        return np.asarray(state, dtype=np.float32)[self.indices]

    def reset(self, state: np.ndarray | None) -> None:
        if self.defaults is not None:
            self._held = self.defaults.copy()
        elif state is not None and np.shape(state) == (self.robot_dim,):
            self._held = np.asarray(state, dtype=np.float32).copy()
        self._apply_holds()

    def __call__(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (len(self.indices),):
            raise ValueError(f"action has {action.size} values, the mapping expects {len(self.indices)}")
        command = self._held.copy()
        command[self.indices] = action
        return command

    def __repr__(self) -> str:
        return f"ActionMapping(robot_dim={self.robot_dim}, policy_dim={len(self.indices)})"


class ReadyPose:
    """A linear ramp from the robot's state to ``pose`` in ``steps`` ticks, played at episode start."""

    def __init__(self, pose: Sequence[float] | np.ndarray, steps: int = 30) -> None:
        if steps < 1:
            raise ValueError(f"ready-pose ramp needs at least 1 step, got {steps}")
        self.pose = np.asarray(pose, dtype=np.float32)
        self.steps = steps

    def ramp(self, state: np.ndarray | None) -> np.ndarray:
        """``(steps, dim)`` commands ending exactly at the pose; no ramp source means one jump."""
        if state is None or np.shape(state) != self.pose.shape:
            return self.pose[None, :].copy()
        start = np.asarray(state, dtype=np.float32)
        fractions = np.arange(1, self.steps + 1, dtype=np.float32)[:, None] / self.steps
        return (start + fractions * (self.pose - start)).astype(np.float32)

    def __repr__(self) -> str:
        return f"ReadyPose(steps={self.steps})"


class ChunkRejected(ValueError):
    """A chunk failed validation; the message names the problem."""


class ChunkValidator:
    """Checks a chunk before it is queued: shape, finite values, limits, jump from the state.

    ``action_dim`` and ``horizon_min`` check the shape; ``limits`` (a
    :class:`JointLimits`) rejects chunks that leave the joint range;
    ``max_jump`` rejects chunks whose first action is further than that from
    the current state (per joint, max norm).
    """

    def __init__(self, action_dim: int | None = None, limits: JointLimits | None = None, max_jump: float | None = None) -> None:
        self.action_dim = action_dim
        self.limits = limits
        self.max_jump = max_jump
        #: Robot joints the policy's values drive (set when an :class:`ActionMapping` places them): the jump
        #: check then compares in the robot's space.
        self.indices: np.ndarray | None = None

    def check(self, chunk: np.ndarray, state: np.ndarray | None = None) -> None:
        """Raise :class:`ChunkRejected` naming the first problem found."""
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ChunkRejected(f"chunk must be (horizon, action_dim) with horizon >= 1, got shape {chunk.shape}")
        if self.action_dim is not None and chunk.shape[1] != self.action_dim:
            raise ChunkRejected(f"chunk has {chunk.shape[1]} values per action, expected {self.action_dim}")
        bad = ~np.isfinite(chunk)
        if bad.any():
            step, joint = np.argwhere(bad)[0]
            raise ChunkRejected(f"chunk has a non-finite value ({chunk[step, joint]}) at step {step}, joint {joint}")
        if self.limits is not None:
            outside = ~self.limits.contains(chunk)
            if outside.any():
                step, joint = np.argwhere(outside)[0]
                raise ChunkRejected(f"chunk leaves the joint limits: {chunk[step, joint]:.4g} at step {step}, joint {joint}")
        if self.max_jump is not None and state is not None:
            state = np.asarray(state, dtype=np.float32)
            if self.indices is not None and state.ndim == 1 and state.size > int(np.max(self.indices, initial=-1)):
                state = state[self.indices]  # the robot joints the policy drives
            if state.shape != chunk.shape[1:]:
                raise ChunkRejected(f"cannot check the jump: the state has shape {state.shape}, the actions {chunk.shape[1:]}")
            jump = float(np.max(np.abs(chunk[0] - state)))
            if jump > self.max_jump:
                raise ChunkRejected(f"chunk starts {jump:.4g} away from the current state (jump bound {self.max_jump:.4g})")
