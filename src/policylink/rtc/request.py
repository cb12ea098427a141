"""The real-time-chunking fields of a request, and what a server announces about them.

A client that executes a chunk while the next one is computed sends, with
its observation, the part of the current chunk it has not executed yet (the
*remainder*, in the policy's action space, before any client filter), how
many control steps it expects to pass before the new chunk arrives (the
*delay* ``d``) and how many of the remainder's steps should guide the new
chunk (the *execution horizon* ``h``). A server whose policy samples chunks
by flow matching then steers the new chunk so that its first ``d`` steps
follow the remainder exactly and the next ones blend into it with decaying
weight (Black et al., 2025, "Real-Time Execution of Action Chunking Flow
Policies"); the client splices the new chunk in at the step it arrives.

On the wire (msgpack over WebSocket and TCP) the fields travel in the
observation map under :data:`RTC_KEY`::

    {"__rtc__": {"prefix": (n, action_dim) float32, "delay": d, "execution_horizon": h,
                 "guidance": 10.0, "schedule": "linear"}}   # the last three optional

gRPC carries the same fields in ``Observation.rtc``. A server announces
:class:`RTCSupport` in its metadata (key ``rtc``; ``None`` when its policy
cannot use the fields, which it then ignores).

This module is numpy-only: the robot-side client imports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import RequestError

__all__ = ["RTC_KEY", "SEED_KEY", "SCHEDULES", "RTCRequest", "RTCSupport", "parse_seed"]

#: Observation key carrying the real-time-chunking fields.
RTC_KEY = "__rtc__"
#: Observation key carrying a seed for the policy's sampling noise (reproducible samples).
SEED_KEY = "__seed__"
#: How the guidance weight falls off after the first ``d`` steps (LeRobot's ``RTCAttentionSchedule``).
SCHEDULES = ("zeros", "ones", "linear", "exp")


@dataclasses.dataclass(frozen=True)
class RTCSupport:
    """What a server's policy does with real-time-chunking fields (announced in its metadata).

    ``guidance`` and ``schedule`` apply when a request names none;
    a request may ask for any guidance weight up to ``max_guidance``.
    """

    #: Largest guidance weight the flow is steered with (LeRobot's ``max_guidance_weight``).
    guidance: float = 10.0
    #: Upper bound on a request's own ``guidance``.
    max_guidance: float = 50.0
    #: Weight schedule after the first ``d`` steps, one of :data:`SCHEDULES`.
    schedule: str = "linear"
    #: Execution horizon used when a request names none (at most the chunk length; clamped to the remainder's).
    execution_horizon: int = 10

    def __post_init__(self) -> None:
        if not (math.isfinite(self.guidance) and 0 < self.guidance <= self.max_guidance and math.isfinite(self.max_guidance)):
            raise ValueError(f"RTC guidance must be in (0, max_guidance={self.max_guidance}], got {self.guidance}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"RTC schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.execution_horizon < 1:
            raise ValueError(f"RTC execution_horizon must be at least 1, got {self.execution_horizon}")

    def within(self, horizon: int) -> RTCSupport:
        """These defaults for a policy whose chunks have ``horizon`` steps (the default horizon clamped to it)."""
        return dataclasses.replace(self, execution_horizon=min(self.execution_horizon, horizon))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RTCSupport | None:
        if not data:
            return None
        return cls(
            guidance=float(data.get("guidance", 10.0)), max_guidance=float(data.get("max_guidance", 50.0)),
            schedule=str(data.get("schedule", "linear")), execution_horizon=int(data.get("execution_horizon", 10)),
        )


@dataclasses.dataclass(frozen=True)
class RTCRequest:
    """The real-time-chunking fields of one request, checked.

    ``prefix`` is the ``(n, action_dim)`` remainder of the current chunk;
    ``delay`` the control steps expected before the new chunk is used
    (``0 <= delay <= execution_horizon``, ``delay <= n``); ``execution_horizon``
    how many of the remainder's steps guide the new chunk (``>= 1``; ``None``:
    the server's default). ``guidance`` and ``schedule`` override the
    server's defaults.
    """

    prefix: np.ndarray
    delay: int
    execution_horizon: int | None = None
    guidance: float | None = None
    schedule: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map sent under :data:`RTC_KEY`."""
        wire: dict[str, Any] = {"prefix": np.ascontiguousarray(self.prefix, np.float32), "delay": int(self.delay)}
        if self.execution_horizon is not None:
            wire["execution_horizon"] = int(self.execution_horizon)
        if self.guidance is not None:
            wire["guidance"] = float(self.guidance)
        if self.schedule is not None:
            wire["schedule"] = self.schedule
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> RTCRequest:
        """Parse the map under :data:`RTC_KEY`; raises :class:`RequestError` naming the bad field."""
        if isinstance(value, RTCRequest):
            return value
        if not isinstance(value, Mapping):
            raise RequestError(f"'{RTC_KEY}' must be a map with prefix and delay (and optionally execution_horizon), got {type(value).__name__}")
        unknown = sorted(str(key) for key in value if key not in ("prefix", "delay", "execution_horizon", "guidance", "schedule"))
        if unknown:
            raise RequestError(f"'{RTC_KEY}' has unknown field(s) {unknown[:5]}; allowed: prefix, delay, execution_horizon, guidance, schedule")
        for name in ("prefix", "delay"):
            if name not in value:
                raise RequestError(f"'{RTC_KEY}' needs '{name}'")
        prefix = _prefix(value["prefix"])
        delay = _whole(value["delay"], "delay", minimum=0)
        horizon = None if value.get("execution_horizon") is None else _whole(value["execution_horizon"], "execution_horizon", minimum=1)
        if horizon is not None:
            _check_delay(delay, horizon)
        if delay > len(prefix):
            raise RequestError(f"'{RTC_KEY}.delay' ({delay}) is longer than the prefix ({len(prefix)} steps): "
                               "the steps executed while the chunk is computed must come from the prefix")
        guidance = value.get("guidance")
        if guidance is not None:
            if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance <= 0:
                raise RequestError(f"'{RTC_KEY}.guidance' must be a number > 0, got {guidance!r:.50}")
            guidance = float(guidance)
        schedule = value.get("schedule")
        if schedule is not None and schedule not in SCHEDULES:
            raise RequestError(f"'{RTC_KEY}.schedule' must be one of {list(SCHEDULES)}, got {str(schedule)!r:.50}")
        return cls(prefix, delay, horizon, guidance, schedule)

    def check(self, support: RTCSupport, action_dim: int, horizon: int) -> None:
        """Refuse fields that do not fit the served policy (its action size and chunk length, the guidance bound)."""
        if self.prefix.shape[1] != action_dim:
            raise RequestError(f"'{RTC_KEY}.prefix' has {self.prefix.shape[1]} values per step; the policy's actions have {action_dim}")
        if len(self.prefix) > horizon:
            raise RequestError(f"'{RTC_KEY}.prefix' has {len(self.prefix)} steps; the policy's chunk has only {horizon}")
        if self.execution_horizon is not None and self.execution_horizon > horizon:
            raise RequestError(f"'{RTC_KEY}.execution_horizon' ({self.execution_horizon}) is past the policy's chunk length ({horizon})")
        if self.execution_horizon is None:
            _check_delay(self.delay, min(support.execution_horizon, horizon), "the server's default ")
        if self.guidance is not None and self.guidance > support.max_guidance:
            raise RequestError(f"'{RTC_KEY}.guidance' ({self.guidance:g}) is above this server's limit ({support.max_guidance:g})")

    def resolved(self, support: RTCSupport) -> tuple[float, str, int]:
        """Guidance weight, schedule and the horizon actually used (clamped to the prefix, as LeRobot does)."""
        guidance = self.guidance if self.guidance is not None else support.guidance
        horizon = self.execution_horizon if self.execution_horizon is not None else support.execution_horizon
        return guidance, self.schedule or support.schedule, min(horizon, len(self.prefix))


def parse_seed(value: Any) -> int | None:
    """The noise seed under :data:`SEED_KEY`: a whole number in ``[0, 2**63)``."""
    if value is None:
        return None
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise RequestError(f"'{SEED_KEY}' must be a whole number in [0, 2**63), got {str(value)!r:.50}")
    return value


def _check_delay(delay: int, horizon: int, whose: str = "") -> None:
    if delay > horizon:
        raise RequestError(f"'{RTC_KEY}.delay' ({delay}) is past {whose or 'the '}execution horizon ({horizon}): the delay must be at most the horizon")


def _prefix(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise RequestError(f"'{RTC_KEY}.prefix' must be a (steps, action_dim) array, got {type(value).__name__}")
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise RequestError(f"'{RTC_KEY}.prefix' must be a (steps, action_dim) array with at least one step, got shape {value.shape}")
    if value.dtype.kind not in "fiu":
        raise RequestError(f"'{RTC_KEY}.prefix' must hold numbers, got dtype {value.dtype}")
    prefix = np.asarray(value, np.float32)
    if not np.isfinite(prefix).all():
        raise RequestError(f"'{RTC_KEY}.prefix' holds non-finite values")
    return prefix


def _whole(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"'{RTC_KEY}.{name}' must be a whole number >= {minimum}, got {str(value)!r:.50}")
    return value
