"""The client-side environment interface.

An environment is whatever the policy acts on: a real robot, a simulator, a
fake that emits observations of the right shapes, or a replay of a recorded
episode. The control loop (:mod:`policylink.runtime`) only ever talks to this
interface, so every environment runs the same executor, filters, monitor and
recorder.

Observations use LeRobot's keys: ``observation.state`` (float32 vector) and
``observation.images.<camera>`` (HxWx3 uint8), plus ``task`` when the
environment has a language instruction.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

from ..types import Observation

__all__ = ["Env", "StepResult"]


@dataclasses.dataclass
class StepResult:
    """What one applied action produced."""

    observation: Observation
    reward: float = 0.0
    #: The episode ended by the task's own rule (success or failure).
    terminated: bool = False
    #: The episode was cut (step limit, operator).
    truncated: bool = False
    success: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class Env(abc.ABC):
    """A robot, simulator, fake or replay, seen from the control loop."""

    #: Short name shown in logs and results (``fake``, ``pusht``, ``so101``...).
    name: str = "env"
    #: Length of the action vector the environment accepts.
    action_dim: int
    #: The environment's native control rate.
    fps: float = 30.0
    #: Whether actions are target positions in the units of :meth:`state` (joint or pose targets). The
    #: control loop then starts each episode's commands from the state and checks jumps against it;
    #: environments whose actions are displacements or velocities (MetaWorld) say ``False``.
    position_actions: bool = True

    @property
    def camera_names(self) -> tuple[str, ...]:
        """Cameras whose frames appear as ``observation.images.<name>``."""
        return ()

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode; return its first observation."""

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> StepResult:
        """Apply one action (``(action_dim,)`` float32) and return what followed."""

    def state(self) -> np.ndarray | None:
        """The current joint state (for jump checks and filters), if known."""
        return None

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-joint ``(low, high)`` of the commands this environment accepts, if known.

        A robot's joint ranges, a simulator's action space. The control loop
        bounds every command it sends to them.
        """
        return None

    def safe_stop(self) -> bool:
        """Bring the hardware to a safe stop (e.g. torque off); ``False`` when the environment has none.

        The control loop calls it when its watchdog trips with the ``stop`` action.
        """
        return False

    def close(self) -> None:
        """Release hardware, windows, files."""

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
