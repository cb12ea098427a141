"""The gRPC transport of :class:`~policylink.client.PolicyClient` (``grpc://`` and ``grpcs://``).

Same interface as :class:`~policylink.client.websocket.WebSocketTransport`
(see :mod:`.transport`): ``connect(timeout)`` returns the metadata frame,
``request(message, timeout)`` returns the reply map, commands are maps with
a ``"__command__"`` key. Needs the ``[grpc]`` extra
(``pip install 'policylink[grpc]'``).

Each request is one unary call with a deadline: a request that times out is
cancelled (the server drops it), so its late reply can never be handed to a
later request. A refused call's exception class comes from the
``policylink-error-kind`` trailer the server sets, or from the status code
for errors raised by gRPC itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc

from ..codec import DEFAULT_MAX_MESSAGE_BYTES
from ..errors import (
    ConnectionFailed,
    InferenceTimeout,
    ProtocolError,
    RequestError,
    ServerBusy,
    ServerError,
    Unauthorized,
    error_for_kind,
)
from ..proto import convert
from ..proto.v1 import policylink_pb2 as pb
from ..proto.v1 import policylink_pb2_grpc as pb_grpc
from .transport import ConnectionLost, check_request_size, client_tls_context, probe_tls

__all__ = ["GrpcTransport", "ERROR_KIND_TRAILER"]

logger = logging.getLogger("policylink.client")

_COMMAND_KEY = "__command__"
_SESSION_HEADER = "policylink-session"
#: Trailing metadata key in which the server names the error kind.
ERROR_KIND_TRAILER = "policylink-error-kind"

#: For errors gRPC raises itself (no kind trailer): the exception class by status code.
_BY_STATUS: dict[grpc.StatusCode, type[Exception]] = {
    grpc.StatusCode.INVALID_ARGUMENT: RequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusy,  # the server's concurrent-call limit
    grpc.StatusCode.UNAUTHENTICATED: Unauthorized,
}
#: Status codes that mean the session or connection is gone: reconnect.
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED)


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
        self.host, self.port = parsed.hostname, parsed.port
        self.target = f"{parsed.hostname}:{parsed.port}"
        self.tls = client_tls_context(ca_file) if parsed.scheme == "grpcs" else None
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

    def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Open the channel (waiting up to ``timeout`` s for the server) and a session."""
        timeout = self.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self.tls is not None:
            self._check_certificate(deadline)
        channel = self._open_channel()
        try:
            grpc.channel_ready_future(channel).result(timeout=max(0.01, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            channel.close()
            raise ConnectionFailed(f"no policy server at {self.url} after {timeout:.3g} s") from None
        stub = pb_grpc.PolicyServiceStub(channel)
        try:
            reply = stub.GetMetadata(pb.MetadataRequest(), metadata=self._headers(with_session=False), timeout=max(0.01, deadline - time.monotonic()))
        except grpc.RpcError as exc:
            channel.close()
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthorized(f"server at {self.url} refused the connection: {exc.details()}") from None
            raise ConnectionFailed(f"server at {self.url} refused the connection: {exc.code().name}: {exc.details()}") from None
        self._channel, self._stub, self._session_id = channel, stub, reply.session_id
        self.metadata_frame = convert.metadata_to_frame(reply)
        logger.info("connected to policy server at %s", self.url)
        return self.metadata_frame

    def _check_certificate(self, deadline: float) -> None:
        """A plain TLS handshake first: a certificate problem is reported at once, not as 'no server'."""
        assert self.tls is not None
        delay = 0.05
        while True:
            try:
                probe_tls(self.host, self.port, self.tls, max(0.05, deadline - time.monotonic()))
                return
            except OSError as exc:
                if isinstance(exc, ConnectionFailed):
                    raise
                if time.monotonic() + delay > deadline:
                    raise ConnectionFailed(f"no policy server at {self.url}: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _open_channel(self) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if self.tls is None:
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

        Raises :class:`InferenceTimeout`, the :class:`ServerError` subclass
        of the server's error kind, :class:`ProtocolError`, or
        :class:`ConnectionLost` when the server or the session is gone.
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
            check_request_size(request.ByteSize(), self.max_message_bytes, self.metadata_frame)
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
        kind = dict(exc.trailing_metadata() or ()).get(ERROR_KIND_TRAILER)
        if kind:
            return error_for_kind(kind, details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return InferenceTimeout(f"no reply from {self.url} within {timeout:.3g} s")
        if code in _LOST:
            self._drop()
            return ConnectionLost(f"{code.name}: {details}")
        return _BY_STATUS.get(code, ServerError)(details or code.name)
