"""Reference designs to compare against, run on 127.0.0.1 only.

- :class:`OpenpiStyleServer`: a server built the way openpi's reference
  WebSocket server works: openpi-client's msgpack codec, and the policy called
  directly inside the connection handler, so inference runs on the event loop
  and clients are served one at a time.
- :class:`RawTcpFloor`: moves the same bytes over a plain TCP socket with a
  4-byte length prefix and no encoding: the floor any protocol sits on.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

from openpi_client import msgpack_numpy
from websockets.asyncio.server import serve

from policylink.types import Policy

__all__ = ["OpenpiStyleServer", "RawTcpFloor", "RawTcpClient", "WebSocketEchoFloor"]


class _ThreadedWebSocketServer:
    """A websockets server on its own thread and event loop; subclasses write ``_handler``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def _handler(self, ws) -> None:
        raise NotImplementedError

    async def _main(self) -> None:
        async with serve(self._handler, self.host, self.port, compression=None, max_size=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class OpenpiStyleServer(_ThreadedWebSocketServer):
    """openpi's reference server design, for baseline rows."""

    def __init__(self, policy: Policy, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.policy = policy

    async def _handler(self, ws) -> None:
        packer = msgpack_numpy.Packer()
        await ws.send(packer.pack(self.policy.metadata.to_dict()))
        prev_total = None
        async for message in ws:
            start = time.monotonic()
            obs = msgpack_numpy.unpackb(message)
            infer_start = time.monotonic()
            reply = self.policy.infer(obs)  # blocks the event loop, as in the reference design
            reply["server_timing"] = {"infer_ms": (time.monotonic() - infer_start) * 1e3}
            if prev_total is not None:
                reply["server_timing"]["prev_total_ms"] = prev_total * 1e3
            await ws.send(packer.pack(reply))
            prev_total = time.monotonic() - start


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        n = sock.recv_into(view[received:])
        if n == 0:
            raise ConnectionError("peer closed")
        received += n
    return bytes(buffer)


class RawTcpFloor:
    """Answers every length-prefixed message with ``reply_size`` bytes."""

    def __init__(self, reply_size: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.reply = b"\x00" * reply_size
        self._sock = socket.create_server((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    (size,) = struct.unpack(">I", _recv_exact(conn, 4))
                    _recv_exact(conn, size)
                    conn.sendall(struct.pack(">I", len(self.reply)) + self.reply)
            except ConnectionError:
                pass

    def __enter__(self) -> RawTcpFloor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        self._thread.join(5)


class RawTcpClient:
    """Sends pre-encoded bytes and reads the raw reply back."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def roundtrip(self, payload: bytes) -> bytes:
        self._sock.sendall(struct.pack(">I", len(payload)) + payload)
        (size,) = struct.unpack(">I", _recv_exact(self._sock, 4))
        return _recv_exact(self._sock, size)

    def close(self) -> None:
        self._sock.close()


class WebSocketEchoFloor(_ThreadedWebSocketServer):
    """The websockets library alone: answers every message with ``reply_size`` bytes, no decoding."""

    def __init__(self, reply_size: int, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.reply = b"\x00" * reply_size

    async def _handler(self, ws) -> None:
        async for _ in ws:
            await ws.send(self.reply)


def _serve_in_this_process(kind: str, port: int, reply_size: int, policy_path: str = "", device: str = "cpu") -> None:
    """Entry point for running a baseline server as its own process (see ``_process.baseline_server``)."""
    from policylink.policies import ConstantPolicy

    if kind == "openpi-style":
        if policy_path:
            from policylink.backends.lerobot import load_policy

            policy = load_policy(policy_path, device=device)
        else:
            policy = ConstantPolicy(value=0.5, action_dim=14, horizon=50)
        server = OpenpiStyleServer(policy, port=port)
    elif kind == "ws-echo":
        server = WebSocketEchoFloor(reply_size, port=port)
    elif kind == "raw-tcp":
        server = RawTcpFloor(reply_size, port=port)
    else:
        raise SystemExit(f"unknown baseline {kind}")
    with server:
        print(f"ready {server.port}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    import sys

    _serve_in_this_process(sys.argv[1], int(sys.argv[2]), *[int(sys.argv[3])] if len(sys.argv) > 3 else [0], *sys.argv[4:6])
