"""What keeps the arm safe with the default settings: bounds, no jumps, no retry storms.

- :class:`ActionBounds`: a per-joint ``[low, high]`` range. The executor
  takes one in the policy's action space (from the server's metadata: the
  checkpoint's action statistics, widened by a margin) to refuse chunks, and
  one in the robot's space (from the environment: joint ranges, a
  simulator's action space) to bound every command that reaches the robot.
- :class:`ResumeRamp`: after anything that broke the stream of fresh actions
  (an episode start, a stall, a watchdog trip, a pause), the command moves
  from where the robot was held to the new trajectory no faster than a bound,
  so a chunk that arrives after an outage never makes the arm jump. The
  bound is configured, or learned: a multiple of the largest per-tick change
  seen recently in normal running (or within the new chunk itself).
- :class:`Backoff`: growing waits between failed requests, so a failing
  server is not hammered 30 times a second, and a bounded number of attempts
  for an episode's first chunk.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ActionBounds", "ResumeRamp", "Backoff", "step_towards", "DEFAULT_BOUNDS_MARGIN"]

#: Chunks may leave the policy's announced action range by this fraction of the range, each side.
DEFAULT_BOUNDS_MARGIN = 0.1


class ActionBounds:
    """Per-joint ``[low, high]``; ``contains`` checks chunks, ``clip`` bounds commands."""

    def __init__(self, low: Any, high: Any) -> None:
        self.low = np.asarray(low, dtype=np.float32).reshape(-1)
        self.high = np.asarray(high, dtype=np.float32).reshape(-1)
        if self.low.shape != self.high.shape or self.low.size == 0:
            raise ValueError(f"bounds need as many low as high values, got {self.low.size} and {self.high.size}")
        if not (np.all(np.isfinite(self.low)) and np.all(np.isfinite(self.high))) or np.any(self.low > self.high):
            raise ValueError(f"bounds need finite low <= high, got low={self.low.tolist()} high={self.high.tolist()}")

    @classmethod
    def from_metadata(cls, metadata: Any, margin: float = DEFAULT_BOUNDS_MARGIN) -> ActionBounds | None:
        """The policy's announced action range widened by ``margin`` of its width (plus a hair), or ``None``."""
        low, high = getattr(metadata, "action_low", None), getattr(metadata, "action_high", None)
        if low is None or high is None:
            return None
        return cls(low, high).widened(margin)

    def widened(self, margin: float) -> ActionBounds:
        # The hair keeps a constant policy (low == high) from refusing its own float rounding.
        pad = margin * (self.high - self.low) + 1e-3 * (1.0 + np.maximum(np.abs(self.low), np.abs(self.high)))
        return ActionBounds(self.low - pad, self.high + pad)

    @property
    def dim(self) -> int:
        return int(self.low.size)

    @property
    def width(self) -> np.ndarray:
        return self.high - self.low

    def outside(self, values: np.ndarray) -> tuple[int, ...] | None:
        """The index of the first value outside the bounds (``values`` is ``(dim,)`` or ``(n, dim)``), or ``None``."""
        bad = (values < self.low) | (values > self.high)
        if not bad.any():
            return None
        return tuple(int(i) for i in np.argwhere(bad)[0])

    def clip(self, command: np.ndarray) -> np.ndarray:
        return np.clip(command, self.low, self.high).astype(np.float32)

    def __repr__(self) -> str:
        return f"ActionBounds(low={self.low.tolist()}, high={self.high.tolist()})"


class ResumeRamp:
    """Limits how fast the command may change while it rejoins the trajectory after an interruption.

    Call :meth:`interrupt` when the stream of fresh actions broke, then pass
    every fresh command through :meth:`__call__` with the last command sent.
    While ramping, each joint moves at most ``step`` per tick towards the
    target; once the command has caught up, commands pass unchanged and their
    per-tick changes teach the ramp what "normal" is. ``step`` is
    ``max_delta`` when configured, else ``factor`` times the largest per-tick
    change of the last ``window`` normal ticks (or of the new chunk's own
    actions, whichever is larger), never below ``floor``.
    """

    def __init__(self, factor: float = 2.0, window: int = 60, max_delta: float | Sequence[float] | None = None, floor: Any = 1e-4) -> None:
        if factor <= 0:
            raise ValueError(f"the resume factor must be positive, got {factor}")
        self.factor = factor
        self.max_delta = None if max_delta is None else np.asarray(max_delta, dtype=np.float32)
        if self.max_delta is not None and np.any(self.max_delta <= 0):
            raise ValueError(f"the resume max_delta must be positive, got {max_delta}")
        self.floor = np.asarray(floor, dtype=np.float32)
        self._recent: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self._chunk_step: np.ndarray | None = None
        self.ramping = True

    def interrupt(self) -> None:
        """The stream of fresh actions broke: ramp the next commands."""
        self.ramping = True

    def new_chunk(self, actions: np.ndarray) -> None:
        """A chunk was queued: its own largest step is a lower bound for what is normal now."""
        if len(actions) > 1:
            self._chunk_step = np.max(np.abs(np.diff(actions, axis=0)), axis=0).astype(np.float32)

    def step(self, dim: int) -> np.ndarray:
        """The largest per-joint change allowed per tick while ramping."""
        if self.max_delta is not None:
            return np.broadcast_to(self.max_delta, (dim,)).astype(np.float32)
        normal = np.max(np.stack(self._recent), axis=0) if self._recent else np.zeros(dim, np.float32)
        if self._chunk_step is not None and self._chunk_step.shape == normal.shape:
            normal = np.maximum(normal, self._chunk_step)
        return np.maximum(self.factor * normal, np.broadcast_to(self.floor, (dim,))).astype(np.float32)

    def __call__(self, target: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """The command to send: ``target``, or a bounded step towards it from ``previous`` while ramping."""
        if previous is None or previous.shape != target.shape:
            return target  # nothing to ramp from (no state, no command yet): the bounds still apply
        delta = target - previous
        if not self.ramping:
            self._recent.append(np.abs(delta).astype(np.float32))
            return target
        step = self.step(target.size)
        if np.all(np.abs(delta) <= step):
            self.ramping = False  # caught up: from now on the trajectory itself
            return target
        return step_towards(previous, target, step)


def step_towards(previous: np.ndarray, target: np.ndarray, step: np.ndarray) -> np.ndarray:
    """One tick from ``previous`` towards ``target``, each joint moving at most ``step``."""
    return (previous + np.clip(target - previous, -step, step)).astype(np.float32)


class Backoff:
    """Growing waits between failures: ``first_s``, doubling up to ``max_s``; counts the attempts."""

    def __init__(self, first_s: float = 0.05, max_s: float = 1.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0

    def failed(self) -> float:
        """Count a failure; return how long to wait before the next attempt."""
        self.failures += 1
        return min(self.max_s, self.first_s * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
