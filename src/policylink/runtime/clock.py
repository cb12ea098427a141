"""The control loop's clocks: real time for robots, stepped time for simulation.

The executor asks its clock two things: "wait for the next tick" and "may a
request sent at tick ``k`` be used now?". :class:`RealTimeClock` sleeps to
hold the rate and answers "when the reply is there". :class:`SteppedClock`
lets no wall time pass: a tick is a counter increment, and a reply counts as
arrived exactly ``latency_steps`` ticks after its request, however long the
real request took, so asynchronous execution can be judged honestly (and
reproducibly) in a simulator.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Protocol

__all__ = ["Clock", "RealTimeClock", "SteppedClock"]


class Clock(Protocol):
    """Paces the control loop."""

    fps: float
    #: Ticks taken since the clock was made.
    ticks: int

    def now(self) -> float:
        """Seconds on this clock's time line (monotonic)."""
        ...

    def restart(self) -> None:
        """The next tick is due now (after a pause or a wait for a first chunk)."""
        ...

    def wait_tick(self) -> None:
        """Block until the next tick is due, then count it."""
        ...

    def arrived(self, future: concurrent.futures.Future, sent_tick: int) -> bool:
        """Whether the reply to a request sent at ``sent_tick`` may be used at this tick."""
        ...


class RealTimeClock:
    """Sleeps to hold ``fps``; a late tick re-anchors the schedule instead of bursting to catch up."""

    def __init__(self, fps: float = 30.0) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.period = 1.0 / fps
        self.ticks = 0
        self._due = time.monotonic()

    def now(self) -> float:
        return time.monotonic()

    def restart(self) -> None:
        self._due = time.monotonic()

    def wait_tick(self) -> None:
        delay = self._due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.monotonic()
        # More than a period late (a slow listener, a GC pause): start a new
        # schedule rather than firing a burst of ticks to catch up.
        self._due = self._due + self.period if now - self._due < self.period else now + self.period
        self.ticks += 1

    def arrived(self, future: concurrent.futures.Future, sent_tick: int) -> bool:
        return future.done()

    def __repr__(self) -> str:
        return f"RealTimeClock(fps={self.fps})"


class SteppedClock:
    """Simulated time: no sleeping; replies arrive ``latency_steps`` ticks after their request.

    When a reply is due but the real request has not finished, ``arrived``
    blocks until it has: the simulation waits for the server, not the other
    way round.
    """

    def __init__(self, fps: float = 30.0, latency_steps: int = 0) -> None:
        if fps <= 0 or latency_steps < 0:
            raise ValueError(f"need fps > 0 and latency_steps >= 0, got {fps}, {latency_steps}")
        self.fps = fps
        self.latency_steps = latency_steps
        self.ticks = 0

    def now(self) -> float:
        return self.ticks / self.fps

    def restart(self) -> None:
        pass

    def wait_tick(self) -> None:
        self.ticks += 1

    def arrived(self, future: concurrent.futures.Future, sent_tick: int) -> bool:
        if self.ticks < sent_tick + self.latency_steps:
            return False
        concurrent.futures.wait([future])
        return True

    def __repr__(self) -> str:
        return f"SteppedClock(fps={self.fps}, latency_steps={self.latency_steps})"
