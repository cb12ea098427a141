"""The front door: one public port that hands each client connection to a replica.

A client connects exactly as to ``policylink serve`` (openpi's client,
``PolicyClient``, ``policylink run``/``eval``). The front door reads the
HTTP request that opens the WebSocket, asks Serve for a replica (one
streaming :meth:`~policylink.rayserve.replica` ``session`` call, held open
for the connection's life), connects to that replica's own port, forwards
the request and from then on relays bytes both ways without reading them.
So every message pays one extra relay on the way, not Serve's HTTP proxy.

A client may ask for a replica that has a checkpoint loaded with the
handshake header ``serve_multiplexed_model_id: PATH`` (Serve's own
convention) or the query ``?model=PATH``; Serve's model multiplexing then
routes it.

``GET /healthz`` and ``GET /metrics`` are answered here for all replicas:
health lists each replica; metrics are every replica's, each sample labelled
with ``replica``. Both follow the API-key rules of a single server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from ..server.auth import ApiKey
from .replica import HEARTBEAT_S

__all__ = ["FrontDoor", "merge_metrics"]

logger = logging.getLogger("policylink.rayserve")

#: Longest HTTP request head accepted before the upgrade (bytes).
MAX_HEAD_BYTES = 16 * 1024
#: A client must finish its request head within this many seconds.
HEAD_TIMEOUT_S = 10.0
#: How long a connection may wait for a replica (Serve replacing a dead one included).
ROUTE_TIMEOUT_S = 10.0
_MODEL_HEADER = "serve_multiplexed_model_id"


class FrontDoor:
    """Listens on ``host:port`` and relays each client to a replica that ``open_session`` names.

    ``open_session(peer, model_id)`` is awaited per connection and returns
    ``(address, release)``: the replica's ``{"host", "port", "replica"}``
    and a function that ends the session. ``replicas()`` returns the
    directory's current view (for health and metrics).
    """

    def __init__(
        self,
        open_session: Callable[[str, str], Any],
        replicas: Callable[[], Any],
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
    ) -> None:
        self.open_session = open_session
        self.replicas = replicas
        self.host = host
        self.port = port
        self.auth = ApiKey(api_key)
        self._server: asyncio.Server | None = None
        self._view: dict[str, dict[str, Any]] = {}
        self._refresher: asyncio.Task | None = None
        #: Connections relayed now, per replica.
        self.relayed: dict[str, int] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientSide(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        await self.refresh()
        self._refresher = asyncio.ensure_future(self._refresh_forever())
        logger.info("front door listening on ws://%s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def refresh(self) -> dict[str, dict[str, Any]]:
        """Read the directory now (it is also read every second)."""
        self._view = await self.replicas()
        return self._view

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.refresh()
            except Exception as exc:  # Ray busy or restarting: keep the last view
                logger.debug("directory not readable: %s", exc)

    # -- HTTP answered here -------------------------------------------------

    def health(self, detailed: bool) -> dict[str, Any]:
        replicas = sorted(self._view.values(), key=lambda info: info["replica"])
        health: dict[str, Any] = {"status": "ok", "ready": any(info.get("ready") for info in replicas), "replicas": len(replicas)}
        if detailed:
            health["clients"] = sum(int(info.get("clients", 0)) for info in replicas)
            health["replica_health"] = replicas
        return health

    async def metrics(self, authorization: str | None) -> str:
        replicas = list(self._view.values())
        texts = await asyncio.gather(*(asyncio.to_thread(_fetch_metrics, info, authorization) for info in replicas), return_exceptions=True)
        scraped = {info["replica"]: text for info, text in zip(replicas, texts) if isinstance(text, str)}
        return merge_metrics(scraped)


class _ClientSide(asyncio.Protocol):
    """One client connection: read the request head, route it, then relay."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.upstream: _Upstream | None = None
        self.release: Callable[[], None] | None = None
        self.replica: str | None = None
        self.routing: asyncio.Task | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.deadline = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD_BYTES:
                self._answer(431, "request head too large\n")
            return
        assert self.transport is not None
        self.transport.pause_reading()  # what follows waits until the replica is connected
        if self.deadline is not None:
            self.deadline.cancel()
        self.routing = asyncio.ensure_future(self._route(bytes(self.head)))

    def eof_received(self) -> bool | None:
        if self.upstream is not None and self.upstream.transport.can_write_eof():
            self.upstream.transport.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self.routing is not None and not self.routing.done():
            self.routing.cancel()
        if self.upstream is not None:
            self.upstream.transport.close()
        self._end_session()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- routing ------------------------------------------------------------

    async def _route(self, head: bytes) -> None:
        request_line, headers = _parse_head(head)
        method, target = (request_line.split(" ") + ["", ""])[:2]
        path, _, query = target.partition("?")
        authorization = headers.get("authorization")
        if method == "GET" and "upgrade" not in headers.get("connection", "").lower():
            await self._answer_http(path, authorization)
            return
        model = headers.get(_MODEL_HEADER) or urllib.parse.parse_qs(query).get("model", [""])[0]
        peer = "%s:%s" % self.transport.get_extra_info("peername")[:2] if self.transport else ""
        try:
            await asyncio.wait_for(self._connect(peer, model, head), ROUTE_TIMEOUT_S)
        except Exception as exc:
            logger.warning("no replica for %s: %s", peer, exc)
            self._end_session()
            self._answer(503, f"no policy replica available: {exc}\n")

    async def _connect(self, peer: str, model: str, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                address, self.release = await self.door.open_session(peer, model)
                _, upstream = await loop.create_connection(lambda: _Upstream(self), address["host"], address["port"])
                break
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a replica that just died: Serve routes the next try to another
                logger.info("no connection to a replica for %s yet (%s); trying again", peer, exc)
                self._end_session()
                await asyncio.sleep(0.05)
        self.upstream = upstream
        self.replica = str(address.get("replica"))
        self.door.relayed[self.replica] = self.door.relayed.get(self.replica, 0) + 1
        upstream.transport.write(head)
        assert self.transport is not None
        if self.transport.is_closing():
            upstream.transport.close()
            return
        self.transport.resume_reading()

    def _end_session(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()
        if self.replica is not None:
            self.door.relayed[self.replica] -= 1
            if not self.door.relayed[self.replica]:
                del self.door.relayed[self.replica]
            self.replica = None

    # -- plain HTTP -------------------------------------------------------------

    async def _answer_http(self, path: str, authorization: str | None) -> None:
        authorized = self.door.auth.accepts_header(authorization)
        if path == "/healthz":
            self._answer(200, json.dumps(self.door.health(detailed=authorized)) + "\n", "application/json")
        elif not authorized:
            self._answer(401, "missing or wrong API key (send 'Authorization: Api-Key KEY')\n")
        elif path == "/metrics":
            self._answer(200, await self.door.metrics(authorization), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._answer(404, "not found: this port serves WebSocket clients, /healthz and /metrics\n")

    def _answer(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        payload = body.encode()
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout", 431: "Request Header Fields Too Large",
                  503: "Service Unavailable"}.get(status, "")
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
        )
        self.transport.close()

    def _too_slow(self) -> None:
        if self.upstream is None and self.routing is None:
            self._answer(408, "request head not received in time\n")


class _Upstream(asyncio.Protocol):
    """The relay's connection to a replica."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)

    def eof_received(self) -> bool | None:
        return None  # close both sides

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()  # the replica went away: its client reconnects through the front door

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _fetch_metrics(info: dict[str, Any], authorization: str | None) -> str:
    request = urllib.request.Request(f"http://{info['host']}:{info['port']}/metrics")
    if authorization:
        request.add_header("Authorization", authorization)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def merge_metrics(scraped: dict[str, str]) -> str:
    """Prometheus text from several replicas as one exposition: every sample gains a ``replica`` label."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    for replica, text in sorted(scraped.items()):
        for family in text_string_to_metric_families(text):
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                target.add_sample(sample.name, {"replica": replica, **sample.labels}, sample.value)

    class _Merged:
        def collect(self) -> Any:
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()
