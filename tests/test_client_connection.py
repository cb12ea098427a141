"""The client's blocking WebSocket connection against a real ``websockets`` server on 127.0.0.1.

The server here is a bare ``websockets`` asyncio server whose handler each
test chooses, run on a thread: it lets a test ping an idle client, send a
fragmented message or close with a given code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from policylink.client.connection import BlockingConnection

Handler = Callable[[ServerConnection], Awaitable[None]]


class ThreadedServer:
    """A ``websockets`` server on 127.0.0.1 running ``handler`` on its own event loop thread."""

    def __init__(self, handler: Handler, **options: object) -> None:
        self.handler = handler
        self.options = {"compression": None, "max_size": None, "ping_interval": None, **options}
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self.handler, "127.0.0.1", 0, **self.options) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(10), "test server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture
def echo_server() -> Iterator[ThreadedServer]:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    with ThreadedServer(echo) as server:
        yield server


def test_echoes_a_message_larger_than_one_socket_write(echo_server: ThreadedServer) -> None:
    # 8 MiB does not fit the socket buffers: sendmsg returns early and the rest must still go out, in order.
    payload = bytes(range(256)) * (32 * 1024)
    connection = BlockingConnection.open(echo_server.url, timeout=10, max_size=None)
    try:
        for _ in range(2):
            connection.send(payload, timeout=10)
            assert connection.recv(timeout=10) == payload
    finally:
        connection.close()


def test_an_idle_connection_answers_the_servers_pings() -> None:
    pongs: list[float] = []
    done = threading.Event()

    async def pinger(ws: ServerConnection) -> None:
        await ws.send(b"hello")
        for _ in range(3):  # the client never calls recv() meanwhile: only the keep-alive can answer
            latency = await asyncio.wait_for(await ws.ping(), timeout=5)
            pongs.append(latency)
        done.set()
        await ws.wait_closed()

    with ThreadedServer(pinger) as server:
        connection = BlockingConnection.open(server.url, timeout=10, keepalive_s=0.05)
        try:
            assert done.wait(20), f"only {len(pongs)} of 3 pings were answered while the client was idle"
            assert connection.recv(timeout=5) == b"hello"  # the frame read by the keep-alive is kept for recv()
        finally:
            connection.close()


def test_without_keepalive_an_idle_connection_leaves_pings_unanswered() -> None:
    outcome: list[str] = []
    done = threading.Event()

    async def pinger(ws: ServerConnection) -> None:
        await ws.recv()  # the client's handshake read is over: from now on nobody reads on its side
        try:
            await asyncio.wait_for(await ws.ping(), timeout=0.5)
            outcome.append("pong")
        except TimeoutError:
            outcome.append("no pong")
        done.set()
        await ws.wait_closed()

    with ThreadedServer(pinger) as server:
        connection = BlockingConnection.open(server.url, timeout=10, keepalive_s=None)
        try:
            connection.send(b"go", timeout=5)
            assert done.wait(10)
            assert outcome == ["no pong"]  # so the keep-alive test above tests the keep-alive
        finally:
            connection.close()


def test_assembles_a_fragmented_message_and_reads_text() -> None:
    async def fragments(ws: ServerConnection) -> None:
        await ws.send([b"ab", b"cd", b"ef"])  # one message in three frames
        await ws.send("text reply")
        await ws.wait_closed()

    with ThreadedServer(fragments) as server:
        connection = BlockingConnection.open(server.url, timeout=10)
        try:
            assert connection.recv(timeout=5) == b"abcdef"
            assert connection.recv(timeout=5) == "text reply"
        finally:
            connection.close()


def test_a_message_over_max_size_closes_with_1009() -> None:
    async def big(ws: ServerConnection) -> None:
        await ws.send(b"x" * 2048)
        await ws.wait_closed()

    with ThreadedServer(big) as server:
        connection = BlockingConnection.open(server.url, timeout=10, max_size=1024)
        with pytest.raises(websockets.ConnectionClosed) as caught:
            connection.recv(timeout=5)
        assert caught.value.sent is not None and caught.value.sent.code == 1009
        connection.close()


def test_the_servers_close_code_reaches_the_caller() -> None:
    async def busy(ws: ServerConnection) -> None:
        await ws.close(1013, "at the connection limit")

    with ThreadedServer(busy) as server:
        connection = BlockingConnection.open(server.url, timeout=10)
        with pytest.raises(websockets.ConnectionClosed) as caught:
            connection.recv(timeout=5)
        assert caught.value.rcvd is not None and (caught.value.rcvd.code, caught.value.rcvd.reason) == (1013, "at the connection limit")
        with pytest.raises(websockets.ConnectionClosed):
            connection.send(b"after close", timeout=5)
        connection.close()


def test_a_recv_timeout_leaves_the_connection_usable(echo_server: ThreadedServer) -> None:
    connection = BlockingConnection.open(echo_server.url, timeout=10)
    try:
        with pytest.raises(TimeoutError):
            connection.recv(timeout=0.05)
        connection.send(b"still here", timeout=5)
        assert connection.recv(timeout=5) == b"still here"
    finally:
        connection.close()


def test_a_refused_handshake_raises_invalid_status() -> None:
    async def never(ws: ServerConnection) -> None:  # pragma: no cover - the handshake is refused first
        pass

    def refuse(connection: ServerConnection, request: object) -> object:
        return connection.respond(401, "no key\n")

    with ThreadedServer(never, process_request=refuse) as server:
        with pytest.raises(websockets.InvalidStatus) as caught:
            BlockingConnection.open(server.url, timeout=5)
        assert caught.value.response.status_code == 401
