"""What the control loop measures about itself, in constant memory.

:class:`LoopStats` collects per-tick numbers (timing, stalls, jumps) and
per-chunk numbers (round trips, rejections) and summarises them;
:class:`LatencyEstimator` is the recent-window latency estimate the
executor plans with.

A robot may run the loop for days, so nothing here grows with the number of
ticks: every series keeps running totals of the whole run plus a fixed-size
window (a preallocated ring buffer) of its most recent samples.

Exact over the whole run (running totals, O(1) to read):

* ``ticks``, ``stalled_ticks``, ``stalls``, ``stall_fraction`` and the
  longest stall (``max_stall_ticks``); ``chunks``, ``rejected_chunks``,
  ``stale_chunks``, ``dropped_actions``, ``errors``, ``watchdog_trips``,
  ``rejected_commands``, ``episodes``;
* ``achieved_fps`` (tick intervals counted over their summed length) and the
  worst tick-interval error ``jitter_max_ms``;
* round trips: count, mean and maximum; boundary jumps: count, mean and
  ``max_boundary_jump``.

Over the recent window only (percentiles need the samples):

* jitter percentiles (``jitter_p50_ms``, ``jitter_p99_ms``): the last
  :data:`TICK_WINDOW` (10 000) tick intervals, about 5.5 minutes at 30 Hz;
* round-trip percentiles (``roundtrip_p50_ms``, ``_p90_``, ``_p99_``): the
  last :data:`ROUNDTRIP_WINDOW` (1 000) chunks;
* boundary jumps kept for inspection: the last :data:`JUMP_WINDOW` (1 000).

The window sizes are keyword arguments of :class:`LoopStats`. The properties
the executor's ``status()`` reads (``achieved_fps``, ``stall_fraction`` and
the counters) are O(1); :meth:`LoopStats.summary` looks at each window once.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["LoopStats", "LatencyEstimator", "RollingWindow", "format_summary", "TICK_WINDOW", "ROUNDTRIP_WINDOW", "JUMP_WINDOW"]

#: Tick intervals kept for the jitter percentiles.
TICK_WINDOW = 10_000
#: Round trips kept for the round-trip percentiles.
ROUNDTRIP_WINDOW = 1_000
#: Boundary jumps kept.
JUMP_WINDOW = 1_000


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
        self._estimate: float | None = None
        self._stale = False

    def add(self, seconds: float) -> None:
        self._recent.append(float(seconds))
        self._stale = True

    def estimate(self) -> float | None:
        """The estimate in seconds, or ``None`` before the first round trip (recomputed only after an ``add``)."""
        if self._stale:
            self._stale = False
            self._estimate = float(np.percentile(np.fromiter(self._recent, float), self.percentile))
        return self._estimate


class RollingWindow:
    """A series of numbers in constant memory: the last ``size`` samples plus whole-run totals.

    ``append`` / ``extend`` are what a list offered; ``len``, iteration and
    indexing see the window (oldest first). ``count``, ``total``, ``mean``,
    ``minimum`` and ``maximum`` are exact over every sample ever appended.
    The samples live in a ring buffer allocated once: appending is O(1)
    and keeps nothing new.
    """

    __slots__ = ("size", "count", "total", "minimum", "maximum", "_buffer", "_next")

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        if size < 1:
            raise ValueError(f"a window needs size >= 1, got {size}")
        self.size = int(size)
        self._buffer = np.zeros(self.size, np.float64)
        self.clear()
        self.extend(values)

    def clear(self) -> None:
        self.count = 0
        self.total = 0.0
        self.minimum = math.inf
        self.maximum = -math.inf
        self._next = 0

    def append(self, value: float) -> None:
        value = float(value)
        position = self._next
        self._buffer[position] = value
        self._next = position + 1 if position + 1 < self.size else 0
        self.count += 1
        self.total += value
        if value > self.maximum:
            self.maximum = value
        if value < self.minimum:
            self.minimum = value

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.append(value)

    @property
    def run_mean(self) -> float:
        """Mean of every sample of the run, not only the window's (0.0 before the first)."""
        return self.total / self.count if self.count else 0.0

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """numpy functions (``np.mean``, ``np.max``...) see the window's samples."""
        return self.values() if dtype is None else self.values().astype(dtype)

    def values(self) -> np.ndarray:
        """A copy of the window's samples, oldest first."""
        if self.count < self.size:
            return self._buffer[: self.count].copy()
        return np.concatenate((self._buffer[self._next :], self._buffer[: self._next]))

    def percentile(self, q: float) -> float:
        """Percentile ``q`` of the window (0.0 when empty)."""
        if not self.count:
            return 0.0
        return float(np.percentile(self._buffer[: min(self.count, self.size)], q))

    def __len__(self) -> int:
        return min(self.count, self.size)

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self) -> Iterator[float]:
        return iter(self.values().tolist())

    def __getitem__(self, index: int | slice) -> Any:
        values = self.values()
        return values[index].tolist() if isinstance(index, slice) else float(values[index])

    def __repr__(self) -> str:
        return f"RollingWindow(size={self.size}, count={self.count}, run_mean={self.run_mean:.6g})"


@dataclasses.dataclass(eq=False)
class LoopStats:
    """Counters and samples of one executor run (all episodes), in constant memory.

    A *tick* is one control period. A *stalled* tick found no action in the
    queue (the robot held its last command); a *stall* is a run of
    consecutive stalled ticks, i.e. one time the queue ran dry.

    ``tick_intervals``, ``roundtrips_ms`` and ``boundary_jumps`` are
    :class:`RollingWindow` objects (``append`` as before); see the module
    docstring for what is exact over the run and what covers the window.
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
    #: The longest stall, in ticks (whole run).
    max_stall_ticks: int = 0
    #: Commands the loop held back instead of sending (counted by the executor).
    rejected_commands: int = 0
    tick_window: int = dataclasses.field(default=TICK_WINDOW, kw_only=True)
    roundtrip_window: int = dataclasses.field(default=ROUNDTRIP_WINDOW, kw_only=True)
    jump_window: int = dataclasses.field(default=JUMP_WINDOW, kw_only=True)
    tick_intervals: RollingWindow = dataclasses.field(init=False, repr=False)
    roundtrips_ms: RollingWindow = dataclasses.field(init=False, repr=False)
    boundary_jumps: RollingWindow = dataclasses.field(init=False, repr=False)
    _stalling: bool = dataclasses.field(default=False, init=False, repr=False)
    _stall_run: int = dataclasses.field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.tick_intervals = RollingWindow(self.tick_window)
        self.roundtrips_ms = RollingWindow(self.roundtrip_window)
        self.boundary_jumps = RollingWindow(self.jump_window)

    def tick(self, now: float, stalled: bool) -> None:
        """Record one tick taken at clock time ``now`` (seconds). O(1); keeps nothing new."""
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
                self._stall_run = 0
            self._stall_run += 1
            if self._stall_run > self.max_stall_ticks:
                self.max_stall_ticks = self._stall_run
        self._stalling = stalled

    def end_episode(self) -> None:
        """The next tick starts a new run: waiting for the first chunk is no stall, nor a tick interval."""
        self._stalling = False
        self.last_tick = None

    # -- whole-run figures, O(1) -------------------------------------------

    @property
    def achieved_fps(self) -> float:
        """Tick intervals per second of tick intervals, over the whole run."""
        total = self.tick_intervals.total
        return self.tick_intervals.count / total if total > 0 else 0.0

    @property
    def stall_fraction(self) -> float:
        return self.stalled_ticks / self.ticks if self.ticks else 0.0

    @property
    def max_boundary_jump(self) -> float:
        """The largest action jump at a chunk boundary, over the whole run."""
        return self.boundary_jumps.maximum if self.boundary_jumps.count else 0.0

    @property
    def jitter_max_ms(self) -> float:
        """The largest ``|tick interval - period|`` in ms, over the whole run."""
        intervals = self.tick_intervals
        if not intervals.count:
            return 0.0
        period = 1.0 / self.fps
        return max(abs(intervals.maximum - period), abs(intervals.minimum - period)) * 1e3

    # -- recent-window figures ---------------------------------------------

    def jitter_ms(self, q: float) -> float:
        """Percentile ``q`` of ``|tick interval - period|`` in ms, over the last ``tick_window`` intervals."""
        if not self.tick_intervals:
            return 0.0
        errors = np.abs(self.tick_intervals.values() - 1.0 / self.fps) * 1e3
        return float(np.percentile(errors, q))

    def roundtrip_ms(self, q: float) -> float:
        """Percentile ``q`` of the last ``roundtrip_window`` round trips (ms)."""
        return self.roundtrips_ms.percentile(q)

    def summary(self) -> dict[str, Any]:
        """Every statistic as plain numbers (JSON-ready); percentiles cover the recent windows."""
        jitter = self.tick_intervals.values()
        if len(jitter):
            jitter_p50, jitter_p99 = np.percentile(np.abs(jitter - 1.0 / self.fps) * 1e3, [50, 99])
        else:
            jitter_p50 = jitter_p99 = 0.0
        roundtrips = self.roundtrips_ms.values()
        if len(roundtrips):
            rt_p50, rt_p90, rt_p99 = np.percentile(roundtrips, [50, 90, 99])
        else:
            rt_p50 = rt_p90 = rt_p99 = 0.0
        return {
            "fps_target": self.fps,
            "fps_achieved": round(self.achieved_fps, 2),
            "ticks": self.ticks,
            "episodes": self.episodes,
            "jitter_p50_ms": round(float(jitter_p50), 3),
            "jitter_p99_ms": round(float(jitter_p99), 3),
            "jitter_max_ms": round(self.jitter_max_ms, 3),
            "tick_intervals": self.tick_intervals.count,
            "jitter_window": len(jitter),
            "stalls": self.stalls,
            "stalled_ticks": self.stalled_ticks,
            "stall_fraction": round(self.stall_fraction, 4),
            "max_stall_ticks": self.max_stall_ticks,
            "chunks": self.chunks,
            "rejected_chunks": self.rejected_chunks,
            "stale_chunks": self.stale_chunks,
            "dropped_actions": self.dropped_actions,
            "errors": self.errors,
            "watchdog_trips": self.watchdog_trips,
            "rejected_commands": self.rejected_commands,
            "roundtrip_p50_ms": round(float(rt_p50), 2),
            "roundtrip_p90_ms": round(float(rt_p90), 2),
            "roundtrip_p99_ms": round(float(rt_p99), 2),
            "roundtrip_mean_ms": round(self.roundtrips_ms.run_mean, 2),
            "roundtrip_max_ms": round(self.roundtrips_ms.maximum if self.roundtrips_ms else 0.0, 2),
            "roundtrips": self.roundtrips_ms.count,
            "roundtrip_window": len(roundtrips),
            "boundary_jumps": self.boundary_jumps.count,
            "max_boundary_jump": round(self.max_boundary_jump, 5),
        }


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines for the end of a run."""
    s = summary

    def recent(window_key: str, count_key: str) -> str:
        # Percentiles cover a recent window; say so once the run outgrew it.
        window, count = s.get(window_key), s.get(count_key)
        return f" (last {window})" if window is not None and count is not None and window < count else ""

    jitter_max = f", max {s['jitter_max_ms']:.2f} ms" if "jitter_max_ms" in s else ""
    longest = f", longest {s['max_stall_ticks']} ticks" if "max_stall_ticks" in s else ""
    rt_max = f", max {s['roundtrip_max_ms']:.1f} ms" if "roundtrip_max_ms" in s else ""
    return "\n".join(
        [
            f"  rate       {s['fps_achieved']:.1f} Hz achieved of {s['fps_target']:g} Hz over {s['ticks']} ticks, {s['episodes']} episode(s); "
            f"jitter p50 {s['jitter_p50_ms']:.2f} ms, p99 {s['jitter_p99_ms']:.2f} ms{recent('jitter_window', 'tick_intervals')}{jitter_max}",
            f"  stalls     {s['stalls']} ({s['stalled_ticks']} ticks, {100 * s['stall_fraction']:.1f}% of ticks held with an empty queue{longest})",
            f"  chunks     {s['chunks']} accepted, {s['rejected_chunks']} rejected, {s['stale_chunks']} stale; "
            f"{s['dropped_actions']} elapsed actions dropped; {s['errors']} request errors; {s['watchdog_trips']} watchdog trips",
            f"  roundtrip  p50 {s['roundtrip_p50_ms']:.1f} ms, p90 {s['roundtrip_p90_ms']:.1f} ms, p99 {s['roundtrip_p99_ms']:.1f} ms"
            f"{recent('roundtrip_window', 'roundtrips')}{rt_max}",
            f"  smoothness largest action jump at a chunk boundary {s['max_boundary_jump']:.4f}",
        ]
    )
