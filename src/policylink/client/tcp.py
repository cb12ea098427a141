"""A minimal client for the length-prefixed TCP protocol (``tcp://host:port``).

Frames are a 4-byte big-endian length + msgpack payload; see
:mod:`policylink.server.tcp` and ``docs/protocols.md``. With ``api_key`` the
client answers a server's ``auth_required`` first frame with
``{"__command__": "auth", "api_key": KEY}``. Errors are raised as the
:class:`~policylink.errors.ServerError` subclass of their ``kind``.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..compression import check_image_codec, compress_images
from ..errors import ConnectionFailed, InferenceTimeout, ProtocolError, Unauthorized, error_for_kind

__all__ = ["TcpClient"]

_HEADER = struct.Struct(">I")
_PROTOCOL = "policylink.v1"


class TcpClient:
    """Blocking request/reply over one TCP connection; ``metadata`` is the server's metadata frame.

    ``timeout`` bounds each request; a request that times out closes the
    connection (its reply would arrive mid-stream) and raises
    :class:`~policylink.errors.InferenceTimeout`. ``image_codec="jpeg"``
    sends camera frames JPEG-compressed at ``quality``, as
    :class:`~policylink.PolicyClient` does (raw frames to a server that does
    not announce JPEG).
    """

    def __init__(
        self, host: str, port: int, timeout: float = 30.0, max_frame_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, api_key: str | None = None,
        image_codec: str | None = None, quality: int = 90,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.timeout = timeout
        self.image_codec = check_image_codec(image_codec, quality)
        self.quality = quality
        self._packer = Packer()
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionFailed(f"no policy server at tcp://{host}:{port}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = self._reply(unpackb(self.recv_frame()))
        if isinstance(first, dict) and first.get("status") == "auth_required":
            if api_key is None:
                self.close()
                raise Unauthorized(f"server at tcp://{host}:{port} needs an API key: {first.get('message', '')}")
            first = self.request({"__command__": "auth", "api_key": api_key})
        self.metadata: dict[str, Any] = first

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

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send an observation or command map; return the reply map (raises on ``{"error": ...}``)."""
        timeout = self.timeout if timeout is None else timeout
        metadata = getattr(self, "metadata", {})
        if metadata.get("protocol") == _PROTOCOL and "__command__" not in message:
            message = {**message, "__timeout_ms__": round(timeout * 1e3, 3)}
            if self.image_codec == "jpeg" and "jpeg" in (metadata.get("image_codecs") or ()):
                message = compress_images(message, self.quality)
        self.sock.settimeout(timeout)
        try:
            self.send_frame(self._packer.pack(message))
            return self._reply(unpackb(self.recv_frame()))
        except TimeoutError:
            self.close()  # the reply is owed mid-stream: this connection cannot be used again
            raise InferenceTimeout(f"no reply within {timeout:.3g} s; connection closed") from None

    @staticmethod
    def _reply(reply: Any) -> Any:
        if isinstance(reply, dict) and "error" in reply and "actions" not in reply:
            raise error_for_kind(reply.get("kind"), str(reply["error"]))
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TcpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
