"""The front door on a background thread: for tests, benchmarks and notebooks (like :class:`~policylink.server.background.BackgroundServer`)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .cluster import RayCluster, serve_forever

__all__ = ["BackgroundFrontDoor"]


class BackgroundFrontDoor:
    """The front door of ``cluster`` on its own event-loop thread.

    >>> with BackgroundFrontDoor(cluster) as door:   # doctest: +SKIP
    ...     client = PolicyClient(door.url)
    """

    def __init__(self, cluster: RayCluster, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> None:
        self.cluster = cluster
        self.host, self.port, self.api_key = host, port, api_key
        self.door: Any = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="policylink-frontdoor", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await serve_forever(self.cluster, self.host, self.port, self.api_key, on_ready=self._on_ready, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
        finally:
            self._ready.set()

    def _on_ready(self, door: Any) -> None:
        self.door = door
        self.port = door.port
        self._ready.set()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def relayed(self) -> dict[str, int]:
        """Client connections relayed now, per replica."""
        return dict(self.door.relayed)

    def start(self) -> BackgroundFrontDoor:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        if self.door is None:
            raise TimeoutError("the front door did not start within 60 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    def __enter__(self) -> BackgroundFrontDoor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
