"""Run protocol servers (gRPC, TCP, LeRobot compat, WebSocket) on one engine in a background thread; raw TCP frames."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from policylink.codec import packb, unpackb
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


def read_frame(sock: socket.socket) -> Any:
    """One length-prefixed msgpack frame from a raw socket, decoded."""
    (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
    return unpackb(_recv_exactly(sock, length))


def send_frame(sock: socket.socket, message: Any) -> None:
    """One length-prefixed msgpack frame to a raw socket."""
    payload = packb(message)
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return data
