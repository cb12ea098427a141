"""Run one or more protocol servers on one engine until Ctrl+C / SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

from .connections import install_log_limits, raise_fd_limit
from .engine import Engine

__all__ = ["ProtocolServer", "ServesInBlock", "run_servers"]

logger = logging.getLogger("policylink.server")


class ProtocolServer(Protocol):
    """What every protocol adapter offers to the app."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class ServesInBlock:
    """Mixin for protocol servers: ``async with Server(...) as server:`` starts it and closes it after."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


#: How long a stopping server lets running requests finish (seconds).
DEFAULT_DRAIN_S = 30.0


async def run_servers(
    engine: Engine,
    servers: Sequence[ProtocolServer],
    on_ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
    *,
    warm_up: Callable[[], None] | None = None,
    drain_s: float = DEFAULT_DRAIN_S,
    summary_s: float | None = None,
) -> None:
    """Start ``servers``, wait for SIGINT/SIGTERM (or ``stop``), then shut down cleanly.

    ``warm_up`` (blocking: load and warm the model, then ``engine.install``
    it) runs on a thread once the ports are open, so ``/healthz`` answers
    during a long load and ``/readyz`` tells when it is done; clients that
    connect meanwhile wait. If it fails, the server stops and the error is
    raised. On SIGTERM the servers stop accepting connections, requests
    already running get up to ``drain_s`` seconds to finish, then every
    connection is closed. Every ``summary_s`` seconds one INFO line sums
    up clients, requests, errors and latency.

    Before listening it lifts the file-descriptor limit (and lowers the
    engine's connection limit to what it leaves room for) and rate-limits the
    server's and asyncio's log records, so a flood of connections or bad
    requests cannot fill the disk with identical lines.
    """
    stop = stop or asyncio.Event()
    engine.connections.limit = raise_fd_limit(engine.connections.limit, len(servers))
    install_log_limits()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (uvloop: ValueError) / not supported
            pass
    started: list[ProtocolServer] = []
    failure: list[BaseException] = []
    tasks: list[asyncio.Task] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        if warm_up is not None:
            tasks.append(asyncio.ensure_future(_warm(warm_up, stop, failure)))
        if summary_s:
            tasks.append(asyncio.ensure_future(_summaries(engine, summary_s)))
        if on_ready:
            on_ready()
        await stop.wait()
        if not failure:
            logger.info("shutting down: no new connections; %d request(s) running get up to %.0f s to finish", engine.in_flight, drain_s)
            for server in started:
                stop_accepting = getattr(server, "stop_accepting", None)
                if stop_accepting is not None:
                    await stop_accepting()
            await engine.drain(drain_s)
    finally:
        for task in tasks:
            task.cancel()
        for server in reversed(started):
            await server.close()
        await engine.aclose()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    if failure:
        raise failure[0]


async def _warm(warm_up: Callable[[], None], stop: asyncio.Event, failure: list[BaseException]) -> None:
    try:
        await asyncio.to_thread(warm_up)
    except Exception as exc:
        logger.error("loading the model failed: %s", exc)
        failure.append(exc)
        stop.set()


async def _summaries(engine: Engine, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        logger.info("%s", engine.summary())
