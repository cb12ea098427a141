"""What the control loop tells its listeners (monitor, recorder, evaluators).

The executor calls every :class:`LoopListener` from the control thread, so a
listener must return quickly: hand heavy work (JPEG encoding, disk writes,
network pushes) to a thread of its own through a bounded queue.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from ..types import Observation

__all__ = ["StepEvent", "ChunkEvent", "EpisodeEvent", "LoopListener", "LoopControl"]


@dataclasses.dataclass
class StepEvent:
    """One control tick."""

    episode: int
    #: The tick within the episode: 0 for the first action, whose observation is the reset observation.
    step: int
    #: ``time.time()`` when the action was applied.
    time: float
    #: The observation at this step, *before* the action: what the action was chosen against
    #: (LeRobot's dataset convention: ``observation.*`` at t with ``action`` at t).
    observation: Observation
    #: The executed (filtered) action; ``None`` when the loop held still.
    action: np.ndarray | None
    #: Id of the chunk the action came from (``None`` if held by the watchdog).
    chunk_id: int | None
    #: True when the action came from a chunk that arrived in time, False when held/stale.
    fresh: bool
    #: What happened when the action was applied: its reward, and whether the episode succeeded or ended.
    reward: float = 0.0
    success: bool = False
    done: bool = False
    #: Latest latencies in ms (``roundtrip_ms``, ``infer_ms``, ...).
    latencies: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ChunkEvent:
    """A chunk arrived from the server (accepted or rejected)."""

    episode: int
    chunk_id: int
    #: Control step of the observation the chunk was computed from.
    obs_step: int
    actions: np.ndarray
    accepted: bool
    reason: str = ""
    roundtrip_ms: float = 0.0
    server_timing: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EpisodeEvent:
    """An episode started or ended."""

    episode: int
    started: bool
    steps: int = 0
    success: bool = False
    total_reward: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class LoopListener(Protocol):
    """Receives the loop's events; every method is optional in practice (no-ops)."""

    def on_step(self, event: StepEvent) -> None: ...

    def on_chunk(self, event: ChunkEvent) -> None: ...

    def on_episode(self, event: EpisodeEvent) -> None: ...


class LoopControl(Protocol):
    """What an operator (the monitor's buttons) may do to a running loop. Thread-safe."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def reset_episode(self) -> None: ...

    def status(self) -> dict[str, Any]: ...
