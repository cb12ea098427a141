"""What the control loop measures about itself.

:class:`LoopStats` collects per-tick numbers (timing, stalls, jumps) and
per-chunk numbers (round trips, rejections) and summarises them;
:class:`LatencyEstimator` is the recent-window latency estimate the
executor plans with.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

__all__ = ["LoopStats", "LatencyEstimator", "format_summary"]


class LatencyEstimator:
    """A percentile of the last ``window`` round trips (seconds).

    A recent window, not an all-time maximum: one slow warm-up request must
    not make the loop over-compensate for the rest of the session.
    """

    def __init__(self, window: int = 20, percentile: float = 90.0) -> None:
        if window < 1 or not 0.0 <= percentile <= 100.0:
            raise ValueError(f"need window >= 1 and 0 <= percentile <= 100, got {window}, {percentile}")
        self.percentile = percentile
        self._recent: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._recent.append(float(seconds))

    def estimate(self) -> float | None:
        """The estimate in seconds, or ``None`` before the first round trip."""
        if not self._recent:
            return None
        return float(np.percentile(np.fromiter(self._recent, float), self.percentile))


@dataclasses.dataclass
class LoopStats:
    """Counters and samples of one executor run (all episodes).

    A *tick* is one control period. A *stalled* tick found no action in the
    queue (the robot held its last command); a *stall* is a run of
    consecutive stalled ticks, i.e. one time the queue ran dry.
    """

    fps: float
    ticks: int = 0
    stalled_ticks: int = 0
    stalls: int = 0
    chunks: int = 0
    rejected_chunks: int = 0
    stale_chunks: int = 0
    dropped_actions: int = 0
    errors: int = 0
    watchdog_trips: int = 0
    episodes: int = 0
    first_tick: float | None = None
    last_tick: float | None = None
    tick_intervals: list[float] = dataclasses.field(default_factory=list)
    roundtrips_ms: list[float] = dataclasses.field(default_factory=list)
    boundary_jumps: list[float] = dataclasses.field(default_factory=list)
    _stalling: bool = False

    def tick(self, now: float, stalled: bool) -> None:
        """Record one tick taken at clock time ``now`` (seconds)."""
        if self.last_tick is not None:
            self.tick_intervals.append(now - self.last_tick)
        if self.first_tick is None:
            self.first_tick = now
        self.last_tick = now
        self.ticks += 1
        if stalled:
            self.stalled_ticks += 1
            if not self._stalling:
                self.stalls += 1
        self._stalling = stalled

    def end_episode(self) -> None:
        """The next tick starts a new run: waiting for the first chunk is no stall, nor a tick interval."""
        self._stalling = False
        self.last_tick = None

    # -- summaries ---------------------------------------------------------

    @property
    def achieved_fps(self) -> float:
        total = sum(self.tick_intervals)
        return len(self.tick_intervals) / total if total > 0 else 0.0

    @property
    def stall_fraction(self) -> float:
        return self.stalled_ticks / self.ticks if self.ticks else 0.0

    def jitter_ms(self, q: float) -> float:
        """Percentile ``q`` of ``|tick interval - period|`` in ms."""
        if not self.tick_intervals:
            return 0.0
        errors = np.abs(np.asarray(self.tick_intervals) - 1.0 / self.fps) * 1e3
        return float(np.percentile(errors, q))

    def roundtrip_ms(self, q: float) -> float:
        return float(np.percentile(self.roundtrips_ms, q)) if self.roundtrips_ms else 0.0

    @property
    def max_boundary_jump(self) -> float:
        return max(self.boundary_jumps, default=0.0)

    def summary(self) -> dict[str, Any]:
        """Every statistic as plain numbers (JSON-ready)."""
        return {
            "fps_target": self.fps,
            "fps_achieved": round(self.achieved_fps, 2),
            "ticks": self.ticks,
            "episodes": self.episodes,
            "jitter_p50_ms": round(self.jitter_ms(50), 3),
            "jitter_p99_ms": round(self.jitter_ms(99), 3),
            "stalls": self.stalls,
            "stalled_ticks": self.stalled_ticks,
            "stall_fraction": round(self.stall_fraction, 4),
            "chunks": self.chunks,
            "rejected_chunks": self.rejected_chunks,
            "stale_chunks": self.stale_chunks,
            "dropped_actions": self.dropped_actions,
            "errors": self.errors,
            "watchdog_trips": self.watchdog_trips,
            "roundtrip_p50_ms": round(self.roundtrip_ms(50), 2),
            "roundtrip_p90_ms": round(self.roundtrip_ms(90), 2),
            "roundtrip_p99_ms": round(self.roundtrip_ms(99), 2),
            "max_boundary_jump": round(self.max_boundary_jump, 5),
        }


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines for the end of a run."""
    s = summary
    return "\n".join(
        [
            f"  rate       {s['fps_achieved']:.1f} Hz achieved of {s['fps_target']:g} Hz over {s['ticks']} ticks, {s['episodes']} episode(s); "
            f"jitter p50 {s['jitter_p50_ms']:.2f} ms, p99 {s['jitter_p99_ms']:.2f} ms",
            f"  stalls     {s['stalls']} ({s['stalled_ticks']} ticks, {100 * s['stall_fraction']:.1f}% of ticks held with an empty queue)",
            f"  chunks     {s['chunks']} accepted, {s['rejected_chunks']} rejected, {s['stale_chunks']} stale; "
            f"{s['dropped_actions']} elapsed actions dropped; {s['errors']} request errors; {s['watchdog_trips']} watchdog trips",
            f"  roundtrip  p50 {s['roundtrip_p50_ms']:.1f} ms, p90 {s['roundtrip_p90_ms']:.1f} ms, p99 {s['roundtrip_p99_ms']:.1f} ms",
            f"  smoothness largest action jump at a chunk boundary {s['max_boundary_jump']:.4f}",
        ]
    )
