"""Run a server on a background thread: for the demo, tests and benchmarks."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ..types import Policy
from .app import run_servers
from .engine import Engine
from .websocket import WebSocketServer

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """A WebSocket server on its own event-loop thread.

    >>> with BackgroundServer(policy) as server:   # doctest: +SKIP
    ...     client = PolicyClient(server.url)

    ``port=0`` picks a free port; ``server.url`` tells which. ``stop()``
    closes at once unless ``drain_s`` gives running requests time to finish.
    """

    def __init__(self, policy: Policy | Engine | None = None, host: str = "127.0.0.1", port: int = 0, *, drain_s: float = 0.0, **ws_options: Any) -> None:
        self.drain_s = drain_s
        self.engine = policy if isinstance(policy, Engine) else Engine(policy)
        self.ws = WebSocketServer(self.engine, host, port, **ws_options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.ws.host}:{self.ws.port}"

    @property
    def port(self) -> int:
        return self.ws.port

    @property
    def running(self) -> bool:
        """Whether the server's thread still runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name="policylink-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        try:
            self._loop.run_until_complete(run_servers(self.engine, [self.ws], on_ready=self._ready.set, stop=self._stop, drain_s=self.drain_s))
        except BaseException as exc:  # surfaced to start()
            self._error = exc
        finally:
            self._ready.set()
            self._loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
