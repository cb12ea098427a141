"""WebSocket + msgpack protocol, wire-compatible with openpi's policy server.

The conversation on one connection:

1. The server sends the policy metadata (a msgpack map) as the first frame.
2. The client sends an observation (a msgpack map, binary frame); the server
   answers with the policy's reply plus ``server_timing``.
3. Errors are sent as a *text* frame (what openpi's client expects); the
   connection stays open for the next request. A client that offers the
   ``policylink.v1`` subprotocol gets the text as JSON,
   ``{"kind": "<error kind>", "message": "..."}``, so it can tell a full
   queue from a bad request without reading the message; others get the
   plain message.

Besides observations a client may send a command map
``{"__command__": "reset" | "configure" | "metadata", ...}``. openpi's
client never does, so the protocol stays compatible.

Everything past the framing (decoding, limits, inference, errors, timing,
metrics) is the engine's one request path. With ``tls_cert``/``tls_key``
the port speaks ``wss://``. ``GET /healthz`` says whether the server is
ready (and, to callers with the API key or when none is set, its models and
clients); ``GET /readyz`` answers 200 once the model is loaded and warmed
(503 during warm-up and while draining); ``GET /metrics`` serves the
Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import ErrorKind, ProtocolError
from .app import ServesInBlock
from .auth import ApiKey
from .engine import COMMAND_KEY, PROTOCOL_VERSION, Engine, Failure, Request
from .metrics import CONTENT_TYPE

__all__ = ["WebSocketServer", "COMMAND_KEY", "server_tls_context"]

logger = logging.getLogger("policylink.server")

T = TypeVar("T")

#: Close code for "message too big" (RFC 6455), sent by the websockets library.
_MESSAGE_TOO_BIG = 1009
#: Close code for "try again later" (RFC 6455): the connection limit is reached.
_TRY_AGAIN_LATER = 1013


def server_tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side TLS context from PEM files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


class WebSocketServer(ServesInBlock):
    """Serves an :class:`Engine` over WebSocket.

    Use as ``async with WebSocketServer(engine, "127.0.0.1", 0) as server:``;
    ``server.port`` is the bound port (useful with port 0). The API key is
    the engine's (``Engine(api_key=...)``); ``api_key`` here is kept as a
    shortcut that sets it.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "0.0.0.0",
        port: int = 8000,
        *,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        self.engine = engine
        if api_key is not None:
            engine.auth = ApiKey(api_key)
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.tls = server_tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self._server: Server | None = None
        self._listening = False

    @property
    def scheme(self) -> str:
        return "wss" if self.tls is not None else "ws"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            ssl=self.tls,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            compression=None,  # images do not compress; deflate would only cost CPU
            max_size=self.max_message_bytes,
            open_timeout=10,  # a half-finished handshake is dropped after 10 s
            ping_interval=20,
            ping_timeout=20,  # a peer that stopped answering is dropped within 40 s
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._listening = True
        logger.info("WebSocket server listening on %s://%s:%d", self.scheme, self.host, self.port)

    async def stop_accepting(self) -> None:
        """Stop listening; open connections stay (a draining server finishes their requests)."""
        if self._server is not None:
            self._server.close(close_connections=False)
            self._listening = False

    async def close(self) -> None:
        """Close every connection (code 1001, going away) and the listener."""
        if self._server is not None:
            if self._listening:
                self._server.close()
            else:  # the listener is closed already; its close() would not run again for the connections
                await asyncio.gather(*(connection.close(1001, "server shutting down") for connection in list(self._server.connections)),
                                     return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    # -- HTTP side: health check, metrics and API key ---------------------

    def _process_request(self, connection: ServerConnection, request: HttpRequest) -> Response | None:
        path = request.path.split("?")[0]
        authorized = self.engine.auth.accepts_header(request.headers.get("Authorization"))
        if path == "/healthz":  # liveness: the process answers
            return _json_response(connection, http.HTTPStatus.OK, self.health(detailed=authorized))
        if path == "/readyz":  # readiness: model loaded and warmed, not draining
            state = "ready" if self.engine.accepting else ("draining" if self.engine.draining else "warming up")
            status = http.HTTPStatus.OK if self.engine.accepting else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _json_response(connection, status, {"ready": self.engine.accepting, "state": state})
        if not authorized:
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key (send 'Authorization: Api-Key KEY')\n")
        if path == "/metrics":
            response = connection.respond(http.HTTPStatus.OK, self.engine.metrics.render().decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = CONTENT_TYPE
            return response
        return None

    def health(self, detailed: bool = True) -> dict[str, Any]:
        """``status`` and ``ready``; with ``detailed`` also clients, cache counters and model ids."""
        health: dict[str, Any] = {"status": "ok", "ready": self.engine.ready}
        if detailed:
            health.update(clients=len(self.engine.sessions), in_flight=self.engine.in_flight, **self.engine.models.stats(),
                          models=self.engine.loaded_model_ids())
        return health

    # -- one connection ---------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        if not self.engine.connections.try_open():
            logger.warning("refused a WebSocket connection: %s", self.engine.connections.refusal())
            await ws.close(_TRY_AGAIN_LATER, self.engine.connections.refusal()[:120])
            return
        peer = "%s:%s" % ws.remote_address[:2] if ws.remote_address else ""
        try:
            await self.engine.wait_ready()  # during warm-up a client waits here for the metadata frame
        except BaseException:
            self.engine.connections.close()
            raise
        session = self.engine.open_session(peer, "websocket", self.max_message_bytes)
        packer = Packer()
        structured = ws.subprotocol == PROTOCOL_VERSION
        # One watcher per connection: a request still being worked on is dropped when its client leaves.
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            await ws.send(packer.pack(self.engine.metadata_frame(session)))
            async for message in ws:
                self.engine.begin()  # until the reply is sent: a draining server waits for it
                try:
                    outcome = await _unless_closed(closed, self.engine.handle(session, message, _decode, packer.pack, quick_decode=Request.quick_from_msgpack))
                    if outcome is None:  # the client left while its request was worked on: dropped
                        break
                    await ws.send(outcome.body if outcome.failure is None else _error_text(outcome.failure, structured))
                finally:
                    self.engine.end()
        except websockets.ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == _MESSAGE_TOO_BIG:
                self.engine.refuse(session, ProtocolError(f"message over the {self.max_message_bytes}-byte limit: connection closed"))
            elif exc.rcvd is None or exc.rcvd.code not in (1000, 1001):
                logger.info("%s: connection closed: %s", session.client_id, exc)
        finally:
            closed.cancel()
            self.engine.close_session(session)
            self.engine.connections.close()


def _json_response(connection: ServerConnection, status: http.HTTPStatus, body: dict[str, Any]) -> Response:
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _select_subprotocol(connection: ServerConnection, offered: Any) -> str | None:
    """``policylink.v1`` when the client offers it; no subprotocol otherwise (openpi's client offers none)."""
    return PROTOCOL_VERSION if PROTOCOL_VERSION in offered else None


def _decode(message: str | bytes) -> Request:
    if isinstance(message, str):
        raise ProtocolError("expected a binary msgpack frame, got a text frame")
    return Request.from_map(unpackb(message))


def _error_text(failure: Failure, structured: bool) -> str:
    if structured:
        return json.dumps({"kind": ErrorKind(failure.kind).value, "message": failure.message})
    return failure.message


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
