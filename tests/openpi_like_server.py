"""A test server that behaves as openpi's ``WebsocketPolicyServer`` does (our own code, written from its documented behaviour).

What it does, as openpi's server does:

- answers ``GET /healthz`` with 200 and upgrades every other request;
- sends its metadata map first (no ``action_dim``, no ``protocol``);
- hands *every* received map to the policy, commands included (openpi has
  none), and replies with the policy's map plus ``server_timing``
  (``infer_ms``, then ``prev_total_ms``);
- when the policy raises, sends the traceback as a text frame and closes the
  connection with code 1011 ("Internal server error. Traceback included in
  previous frame.").

Messages are encoded with ``openpi_client.msgpack_numpy`` (openpi's own
package from PyPI), so the bytes are openpi's. It records every map it
received and every error, for the tests to assert on.
"""

from __future__ import annotations

import asyncio
import http
import threading
import time
import traceback
from typing import Any

import numpy as np
import websockets
import websockets.asyncio.server
from openpi_client import msgpack_numpy

INTERNAL_ERROR = 1011


class OpenpiStylePolicy:
    """Reads openpi's LIBERO-style keys; a map without them fails, as openpi's input transforms do."""

    def __init__(self, action_dim: int = 6, horizon: int = 10) -> None:
        self.action_dim, self.horizon = action_dim, horizon

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        state = np.asarray(obs["observation/state"], np.float32)  # KeyError for a command map, as in openpi
        image = np.asarray(obs["observation/image"])
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"observation/image must be HxWx3 uint8, got {image.shape} {image.dtype}")
        if not isinstance(obs["prompt"], str):
            raise TypeError("prompt must be a string")
        if state.shape != (self.action_dim,):
            raise ValueError(f"state must have {self.action_dim} values, got {state.shape}")
        steps = 0.01 * np.arange(self.horizon, dtype=np.float32)[:, None]
        return {"actions": (state[None, :] + steps).astype(np.float32)}


class OpenpiLikeServer:
    """Runs on its own thread and event loop, on 127.0.0.1; ``with OpenpiLikeServer() as server: server.url``."""

    def __init__(self, policy: Any = None, metadata: dict[str, Any] | None = None) -> None:
        self.policy = policy or OpenpiStylePolicy()
        self.metadata = {"policy_name": "openpi-like test policy"} if metadata is None else metadata
        self.received: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openpi-like-server", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> OpenpiLikeServer:
        self._thread.start()
        assert self._ready.wait(10), "the openpi-like server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with websockets.asyncio.server.serve(
            self._handler, "127.0.0.1", 0, compression=None, max_size=None, process_request=_health_check,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _handler(self, websocket: websockets.asyncio.server.ServerConnection) -> None:
        self.connections += 1
        packer = msgpack_numpy.Packer()
        await websocket.send(packer.pack(self.metadata))
        previous_total: float | None = None
        while True:
            try:
                started = time.monotonic()
                obs = msgpack_numpy.unpackb(await websocket.recv())
                self.received.append(obs)
                infer_started = time.monotonic()
                action = self.policy.infer(obs)
                timing = {"infer_ms": (time.monotonic() - infer_started) * 1000}
                if previous_total is not None:
                    timing["prev_total_ms"] = previous_total * 1000
                action["server_timing"] = timing
                await websocket.send(packer.pack(action))
                previous_total = time.monotonic() - started
            except websockets.ConnectionClosed:
                break
            except Exception:
                self.errors.append(traceback.format_exc())
                await websocket.send(traceback.format_exc())
                await websocket.close(code=INTERNAL_ERROR, reason="Internal server error. Traceback included in previous frame.")
                return  # openpi re-raises here; the connection is closed either way


def _health_check(connection: Any, request: Any) -> Any:
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None
