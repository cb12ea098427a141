"""Bounds on connections: how many at once, file descriptors, and log floods.

A server that accepts every connection runs out of file descriptors, and
then cannot accept anyone, not even ``/healthz``; asyncio then logs a
traceback for every refused accept. Three guards keep it serving:

- :class:`ConnectionBudget`: one count of open WebSocket and TCP connections
  for the whole server; past the limit a new connection gets a clear refusal
  (HTTP 503 on WebSocket, an error frame on TCP) and is closed at once.
- :func:`raise_fd_limit`: lifts the soft file-descriptor limit to the hard
  one at start-up and says how many connections it leaves room for, after
  the descriptors already open and a reserve for later ones.
- :class:`RateLimitedLog`: a logging filter that lets a burst of identical
  messages through, then one summary per interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["ConnectionBudget", "raise_fd_limit", "RateLimitedLog", "install_log_limits", "DEFAULT_MAX_CONNECTIONS"]

logger = logging.getLogger("policylink.server")

#: Default limit on simultaneous WebSocket + TCP connections of one server.
DEFAULT_MAX_CONNECTIONS = 512
#: File descriptors kept free for model files, logs, gRPC and the like.
_FD_RESERVE = 64
#: asyncio accepts up to its listen backlog (100) connections in one go, before any handler can refuse them.
_ACCEPT_BURST = 100


class ConnectionBudget:
    """Counts the server's open connections; :meth:`try_open` refuses past ``limit``."""

    def __init__(self, limit: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if limit < 1:
            raise ValueError(f"the connection limit must be at least 1, got {limit}")
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def try_open(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def close(self) -> None:
        with self._lock:
            self.open = max(0, self.open - 1)

    def refusal(self) -> str:
        return f"server busy: too many connections ({self.limit} open, the server's limit); retry later"


def raise_fd_limit(wanted_connections: int, listeners: int = 1) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the connections it leaves room for.

    The room is what is left after the descriptors open now, a reserve, and
    one accept burst per listening port.
    """
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise
        return wanted_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    room = max(1, soft - _open_descriptors() - _FD_RESERVE - _ACCEPT_BURST * listeners)
    if room < wanted_connections:
        logger.warning("only %d file descriptors: limiting connections to %d (raise 'ulimit -n' for more)", soft, room)
        return room
    return wanted_connections


def _open_descriptors() -> int:
    """File descriptors this process holds now (libraries, model files, pipes, listeners)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc (macOS): assume a modest start-up cost
        return 64


class RateLimitedLog(logging.Filter):
    """Passes ``burst`` records of one message template per ``interval_s``, then drops them.

    The first record after a quiet interval carries a note of how many were
    dropped. Records are told apart by logger name and unformatted message,
    so one flood does not silence other messages.
    """

    def __init__(self, burst: int = 20, interval_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self._windows: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] > self.interval_s:
                dropped = int(window[2]) if window else 0
                self._windows[key] = [now, 1, 0]
                if len(self._windows) > 1000:  # forget old templates rather than grow without bound
                    self._windows = {k: v for k, v in self._windows.items() if now - v[0] <= self.interval_s}
                if dropped:
                    record.msg = f"{record.msg} ({dropped} similar messages suppressed in the last {self.interval_s:g} s)"
                return True
            window[1] += 1
            if window[1] <= self.burst:
                return True
            window[2] += 1
            return False


def install_log_limits(burst: int = 20, interval_s: float = 10.0) -> RateLimitedLog:
    """Rate-limit the server's and asyncio's log records (asyncio logs every failed accept)."""
    limiter = RateLimitedLog(burst, interval_s)
    for name in ("policylink.server", "asyncio", "websockets.server", "grpc._cython.cygrpc"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in target.filters):
            target.addFilter(limiter)
    return limiter
