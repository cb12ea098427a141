"""WebSocket + msgpack protocol, wire-compatible with openpi's policy server.

The conversation on one connection:

1. The server sends the policy metadata (a msgpack map) as the first frame.
2. The client sends an observation (a msgpack map, binary frame); the server
   answers with the policy's reply plus ``server_timing``.
3. Errors are sent as a *text* frame naming the problem (what openpi's client
   expects); the connection stays open for the next request.

Besides observations a client may send a command map
``{"__command__": "reset" | "configure" | "metadata", ...}``. openpi's
client never does, so the protocol stays compatible.

``GET /healthz`` answers 200 with a small JSON status (``ready``, the loaded
``models``, clients); ``GET /metrics`` serves the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import ProtocolError, RequestError, ServerBusy
from .app import ServesInBlock
from .engine import COMMAND_KEY, ClientSession, Engine
from .metrics import CONTENT_TYPE, loaded_model_ids

__all__ = ["WebSocketServer", "COMMAND_KEY"]

logger = logging.getLogger("policylink.server")

T = TypeVar("T")



class WebSocketServer(ServesInBlock):
    """Serves an :class:`Engine` over WebSocket.

    Use as ``async with WebSocketServer(engine, "127.0.0.1", 0) as server:``;
    ``server.port`` is the bound port (useful with port 0).
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "0.0.0.0",
        port: int = 8000,
        *,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            compression=None,  # images do not compress; deflate would only cost CPU
            max_size=self.max_message_bytes,
            ping_interval=20,
            ping_timeout=60,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("WebSocket server listening on ws://%s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # -- HTTP side: health check and API key ------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] == "/healthz":
            body = json.dumps(self.health())
            response = connection.respond(http.HTTPStatus.OK, body + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        if request.path.split("?")[0] == "/metrics":
            response = connection.respond(http.HTTPStatus.OK, self.engine.metrics.render().decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = CONTENT_TYPE
            return response
        if self.api_key is not None and request.headers.get("Authorization") != f"Api-Key {self.api_key}":
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        return None

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "ready": self.engine.ready, "clients": len(self.engine.sessions), **self.engine.models.stats(), "models": loaded_model_ids(self.engine)}

    # -- one connection ---------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        peer = "%s:%s" % ws.remote_address[:2] if ws.remote_address else ""
        session = self.engine.open_session(peer)
        packer = Packer()
        # One watcher per connection: lets a request that waits in a queue be dropped when its client leaves.
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            await ws.send(packer.pack(self.engine.metadata_frame(session)))
            async for message in ws:
                started = time.perf_counter()
                try:
                    reply = await _unless_closed(closed, self._answer(session, message))
                    if reply is None:  # the client left while its request waited: drop it
                        break
                except (RequestError, ProtocolError, ServerBusy) as exc:
                    self.engine.metrics.request_failed("websocket", exc)
                    await self._send_error(ws, session, str(exc))
                    continue
                except Exception as exc:  # a broken policy must not take the server down
                    logger.exception("%s: inference failed", session.client_id)
                    self.engine.metrics.request_failed("websocket", exc)
                    await self._send_error(ws, session, f"inference failed: {type(exc).__name__}: {exc}")
                    continue
                await ws.send(packer.pack(reply))
                self.engine.record_total(session, (time.perf_counter() - started) * 1e3)
                self.engine.metrics.request_done("websocket", reply, time.perf_counter() - started)
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code not in (1000, 1001):
                logger.info("%s: connection closed: %s", session.client_id, exc)
        finally:
            closed.cancel()
            self.engine.close_session(session)

    async def _answer(self, session: ClientSession, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, str):
            raise ProtocolError("expected a binary msgpack frame, got a text frame")
        decode_started = time.perf_counter()
        request = unpackb(message)
        decode_ms = (time.perf_counter() - decode_started) * 1e3
        if not isinstance(request, dict):
            raise RequestError(f"a request must be a msgpack map, got {type(request).__name__}")
        if COMMAND_KEY in request:
            return await self.engine.command(session, request)
        reply = await self.engine.infer(session, request)
        reply["server_timing"]["decode_ms"] = round(decode_ms, 3)
        return reply

    async def _send_error(self, ws: ServerConnection, session: ClientSession, message: str) -> None:
        session.errors += 1
        logger.warning("%s: request #%d refused: %s", session.client_id, session.requests, message)
        await ws.send(message)


async def _unless_closed(closed: asyncio.Future, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless ``closed`` (the connection's end) comes first; then cancel it and return ``None``.

    Cancelling takes a queued request out of its model's batch queue.
    """
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    return None
