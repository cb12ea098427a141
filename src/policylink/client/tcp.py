"""A minimal client for the length-prefixed TCP protocol (``tcp://host:port``).

Frames are a 4-byte big-endian length + msgpack payload; see
:mod:`policylink.server.tcp` and ``docs/protocols.md``.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import ProtocolError, ServerBusy, ServerError

__all__ = ["TcpClient"]

_HEADER = struct.Struct(">I")


class TcpClient:
    """Blocking request/reply over one TCP connection; ``metadata`` is the server's first frame."""

    def __init__(self, host: str, port: int, timeout: float = 30.0, max_frame_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._packer = Packer()
        self.metadata: dict[str, Any] = unpackb(self.recv_frame())

    def send_frame(self, payload: bytes) -> None:
        self.sock.sendall(_HEADER.pack(len(payload)) + payload)

    def recv_frame(self) -> bytes:
        (length,) = _HEADER.unpack(self._recv_exactly(_HEADER.size))
        if length > self.max_frame_bytes:
            raise ProtocolError(f"server frame of {length} bytes exceeds the {self.max_frame_bytes}-byte limit")
        return self._recv_exactly(length)

    def _recv_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError(f"server closed the connection after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send an observation or command map; return the reply map (raises on ``{"error": ...}``)."""
        self.send_frame(self._packer.pack(message))
        reply = unpackb(self.recv_frame())
        if isinstance(reply, dict) and "error" in reply and "actions" not in reply:
            message_text = str(reply["error"])
            raise ServerBusy(message_text) if message_text.startswith("server busy") else ServerError(message_text)
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TcpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
