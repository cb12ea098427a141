"""The gRPC transport of :class:`~policylink.client.PolicyClient` (``grpc://`` and ``grpcs://``).

Same interface as :class:`~policylink.client.websocket.WebSocketTransport`:
``connect()`` returns the metadata frame, ``request(message, timeout)``
returns the reply map, commands are maps with a ``"__command__"`` key.
Needs the ``[grpc]`` extra (``pip install 'policylink[grpc]'``).

Each request is one unary call with a deadline: a request that times out is
cancelled, so its late reply can never be handed to a later request.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc

from ..codec import DEFAULT_MAX_MESSAGE_BYTES
from ..errors import ConnectionFailed, InferenceTimeout, ProtocolError, ServerBusy, ServerError
from ..proto import convert
from ..proto.v1 import policylink_pb2 as pb
from ..proto.v1 import policylink_pb2_grpc as pb_grpc

__all__ = ["GrpcTransport"]

logger = logging.getLogger("policylink.client")

_COMMAND_KEY = "__command__"
_SESSION_HEADER = "policylink-session"


class SessionLost(ConnectionError):
    """The server no longer knows this client's session (it restarted): reconnect."""


class GrpcTransport:
    """One session with a policylink gRPC server.

    ``ca_file`` (PEM) is the certificate authority that signed a ``grpcs://``
    server's certificate (default: the system's roots). ``jpeg_quality``
    sends HxWx3 uint8 frames JPEG-compressed.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        connect_timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        ca_file: str | Path | None = None,
        jpeg_quality: int | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("grpc", "grpcs") or not parsed.hostname or not parsed.port:
            raise ValueError(f"unsupported gRPC URL {url!r}: expected grpc://host:port or grpcs://host:port")
        self.url = url
        self.target = f"{parsed.hostname}:{parsed.port}"
        self.tls = parsed.scheme == "grpcs"
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self.ca_file = ca_file
        self.jpeg_quality = jpeg_quality
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.PolicyServiceStub | None = None
        self._session_id = ""
        self._step = 0
        self.metadata_frame: dict[str, Any] = {}

    # -- connection -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._stub is not None

    def connect(self) -> dict[str, Any]:
        """Open the channel (waiting for a server that is not up yet) and a session."""
        channel = self._open_channel()
        try:
            grpc.channel_ready_future(channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            raise ConnectionFailed(f"no policy server at {self.url} after {self.connect_timeout:.0f} s") from None
        stub = pb_grpc.PolicyServiceStub(channel)
        try:
            reply = stub.GetMetadata(pb.MetadataRequest(), metadata=self._headers(with_session=False), timeout=self.connect_timeout)
        except grpc.RpcError as exc:
            channel.close()
            raise ConnectionFailed(f"server at {self.url} refused the connection: {exc.code().name}: {exc.details()}") from None
        self._channel, self._stub, self._session_id = channel, stub, reply.session_id
        self.metadata_frame = convert.metadata_to_frame(reply)
        logger.info("connected to policy server at %s (session %s)", self.url, self._session_id)
        return self.metadata_frame

    def _open_channel(self) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if not self.tls:
            return grpc.insecure_channel(self.target, options=options)
        roots = Path(self.ca_file).read_bytes() if self.ca_file else None
        return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)

    def _headers(self, with_session: bool = True) -> list[tuple[str, str]]:
        headers = []
        if self.api_key:
            headers.append(("authorization", f"Bearer {self.api_key}"))
        if with_session and self._session_id:
            headers.append((_SESSION_HEADER, self._session_id))
        return headers

    def close(self) -> None:
        if self._stub is not None:
            try:  # free the server-side session now rather than at its idle timeout
                self._stub.Close(pb.CloseRequest(), metadata=self._headers(), timeout=2.0)
            except grpc.RpcError:
                pass
        self._drop()

    def _drop(self) -> None:
        """Forget the channel and session without telling the server (it is gone)."""
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None
        self._session_id = ""

    # -- requests ---------------------------------------------------------

    def request(self, message: dict[str, Any], timeout: float) -> Any:
        """Send ``message`` (an observation or a command) and return the reply map.

        Raises :class:`InferenceTimeout`, :class:`ServerError` / :class:`ServerBusy`
        (the server's message), :class:`ProtocolError`, or ``ConnectionError``
        when the server is gone (the caller decides whether to reconnect).
        """
        if self._stub is None:
            self.connect()
        assert self._stub is not None
        try:
            return self._call(self._stub, message, timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, timeout) from None

    def _call(self, stub: pb_grpc.PolicyServiceStub, message: dict[str, Any], timeout: float) -> Any:
        headers = self._headers()
        command = message.get(_COMMAND_KEY)
        if command is None:
            self._step += 1
            request = convert.observation_to_proto(message, self._step, self.jpeg_quality)
            if request.ByteSize() > self.max_message_bytes:
                raise ProtocolError(f"message is {request.ByteSize()} bytes, over the {self.max_message_bytes}-byte limit")
            return convert.proto_to_reply(stub.Infer(request, metadata=headers, timeout=timeout))
        if command == "reset":
            stub.Reset(pb.ResetRequest(), metadata=headers, timeout=timeout)
            return {"ok": True}
        if command == "metadata":
            return convert.metadata_to_frame(stub.GetMetadata(pb.MetadataRequest(), metadata=headers, timeout=timeout))
        if command == "configure":
            rename = message.get("rename_map") or {}
            if isinstance(rename, str):
                rename = dict(item.split("=", 1) for item in rename.split(",") if "=" in item)
            request = pb.ConfigureRequest(
                policy_path=str(message.get("policy_path") or ""), device=str(message.get("device") or ""),
                dtype=str(message.get("dtype") or ""), prompt=str(message.get("task") or ""),
                rename_map={str(k): str(v) for k, v in dict(rename).items()}, fps=float(message.get("fps") or 0.0),
            )
            return {"ok": True, **convert.metadata_to_frame(stub.Configure(request, metadata=headers, timeout=timeout))}
        raise ProtocolError(f"unknown command {command!r}; known: configure, metadata, reset")

    def _error(self, exc: grpc.RpcError, timeout: float) -> Exception:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return InferenceTimeout(f"no reply from {self.url} within {timeout:.3g} s")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ServerBusy(details)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED):
            self._drop()
            return SessionLost(f"{code.name}: {details}")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ConnectionFailed(f"server at {self.url} refused the request: {details}")
        return ServerError(details or code.name)
