"""Run protocol servers (gRPC, TCP, LeRobot compat, WebSocket) on one engine in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from policylink.server.app import run_servers
from policylink.server.engine import Engine


@contextmanager
def running(engine: Engine, servers: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """Start ``servers`` on their own event loop; stop them (and the engine) on exit."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        state["loop"], state["stop"] = loop, stop
        try:
            loop.run_until_complete(run_servers(engine, servers, on_ready=ready.set, stop=stop))
        except BaseException as exc:  # surfaced below
            state["error"] = exc
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=run, name="test-protocol-servers", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in state:
        raise state["error"]
    try:
        yield servers
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(15)
