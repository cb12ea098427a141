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


async def run_servers(
    engine: Engine,
    servers: Sequence[ProtocolServer],
    on_ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start ``servers``, wait for SIGINT/SIGTERM (or ``stop``), then shut down cleanly.

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
    try:
        for server in servers:
            await server.start()
            started.append(server)
        if on_ready:
            on_ready()
        await stop.wait()
        logger.info("shutting down")
    finally:
        for server in reversed(started):
            await server.close()
        await engine.aclose()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
