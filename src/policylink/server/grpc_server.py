"""Typed gRPC protocol (``policylink.v1.PolicyService``) on the asyncio event loop.

The schema is ``proto/policylink/proto/v1/policylink.proto``. A client

1. calls ``GetMetadata`` without a session header: the server opens a
   session and returns the policy metadata with its ``session_id``;
2. names that session in the ``policylink-session`` header of every later
   call (``Configure``, ``Infer``, ``Stream``, ``Reset``, ``Close``).

Session ids are unguessable and bound to the connection that opened them: a
call naming a session from another connection is refused like an unknown
session (``NOT_FOUND``). Sessions left idle for ``session_idle_s`` are
closed by a timer. A ``Stream`` call without a session header gets a
session of its own for the duration of the stream; an observation it
refuses is answered with a chunk carrying only ``error``, ``error_kind``
(and its ``step``), and the stream goes on.

Handlers receive the raw request bytes: decoding (bounded, see
:mod:`policylink.proto.wire_limits`) happens on the engine's decode threads,
not on the event loop. A refused call ends with the status code of its
:class:`~policylink.errors.ErrorKind` and the kind itself in the
``policylink-error-kind`` trailer: bad input ``INVALID_ARGUMENT``, a full
queue ``RESOURCE_EXHAUSTED``, no model ``FAILED_PRECONDITION``, a path outside
``--model-root`` ``PERMISSION_DENIED``, a missing key ``UNAUTHENTICATED``, a
passed deadline ``DEADLINE_EXCEEDED``, a failing policy ``INTERNAL``. The
server keeps serving every other call.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from ..codec import DEFAULT_MAX_MESSAGE_BYTES
from ..errors import ErrorKind
from ..proto import convert
from ..proto.v1 import policylink_pb2 as pb
from ..proto.v1 import policylink_pb2_grpc as pb_grpc  # noqa: F401  (the generated stub, for clients)
from .app import ServesInBlock
from .auth import ApiKey
from .engine import ClientSession, Engine, Failure, Request

__all__ = [
    "GrpcServer", "SESSION_HEADER", "ERROR_KIND_TRAILER", "STATUS_OF_KIND",
    "grpc_server_options", "abort", "call_headers", "checked_headers", "expire_periodically",
]

logger = logging.getLogger("policylink.server")

#: Call metadata key naming the client's session.
SESSION_HEADER = "policylink-session"
#: Trailing metadata key carrying the error kind of a refused call.
ERROR_KIND_TRAILER = "policylink-error-kind"

STATUS_OF_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.NOT_LOADED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options of every gRPC port: message limits, and bounds on idle or half-open connections."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.server_handshake_timeout_ms", 10_000),  # a half-sent handshake is dropped after 10 s
        ("grpc.max_connection_idle_ms", 600_000),  # a connection without calls for 10 min is closed
    ]


async def abort(context: aio.ServicerContext, failure: Failure) -> None:
    """End the call with the status code and trailer of ``failure``'s kind."""
    kind = ErrorKind(failure.kind)
    await context.abort(STATUS_OF_KIND[kind], failure.message, trailing_metadata=((ERROR_KIND_TRAILER, kind.value),))


def call_headers(context: aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


async def checked_headers(engine: Engine, context: aio.ServicerContext, protocol: str) -> dict[str, str]:
    """The call's headers once its API key is checked; ends the call as ``UNAUTHENTICATED`` otherwise."""
    headers = call_headers(context)
    if not engine.auth.accepts_header(headers.get("authorization")):
        engine.metrics.request_failed(protocol, ErrorKind.UNAUTHORIZED)
        await abort(context, Failure(ErrorKind.UNAUTHORIZED, "missing or wrong API key (send 'authorization: Bearer KEY')"))
    return headers


async def expire_periodically(expire: Callable[[], int], idle_s: float) -> None:
    """Call ``expire`` a few times per ``idle_s`` (at most every 30 s), until cancelled."""
    period = max(0.05, min(30.0, idle_s / 4))
    while True:
        await asyncio.sleep(period)
        expire()


class _GrpcSession:
    """An engine session, the connection that opened it, and when it was last used."""

    def __init__(self, session: ClientSession, peer: str) -> None:
        self.session = session
        self.peer = peer
        self.last_used = time.monotonic()


class GrpcServer(ServesInBlock):
    """Serves an :class:`Engine` over gRPC (``grpc.aio``).

    ``tls_cert`` / ``tls_key`` (PEM files) switch the port to TLS. The API
    key is the engine's (``api_key`` here is a shortcut that sets it).
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "0.0.0.0",
        port: int = 50051,
        *,
        api_key: str | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        session_idle_s: float = 600.0,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        self.engine = engine
        if api_key is not None:
            engine.auth = ApiKey(api_key)
        self.host = host
        self.port = port
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.max_message_bytes = max_message_bytes
        self.session_idle_s = session_idle_s
        self._sessions: dict[str, _GrpcSession] = {}
        self._server: aio.Server | None = None
        self._expiry: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "grpcs" if self.tls_cert else "grpc"

    async def start(self) -> None:
        self._server = aio.server(options=grpc_server_options(self.max_message_bytes), maximum_concurrent_rpcs=self.engine.connections.limit)
        self._server.add_generic_rpc_handlers((self._handlers(),))
        address = f"{self.host}:{self.port}"
        if self.tls_cert is not None and self.tls_key is not None:
            credentials = grpc.ssl_server_credentials([(Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())])
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"gRPC server could not bind {address}")
        await self._server.start()
        self._expiry = asyncio.ensure_future(expire_periodically(self.expire_idle, self.session_idle_s))
        logger.info("gRPC server listening on %s://%s:%d", self.scheme, self.host, self.port)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        for entry in list(self._sessions.values()):
            self.engine.close_session(entry.session)
        self._sessions.clear()

    def _handlers(self) -> grpc.GenericRpcHandler:
        """Raw-bytes handlers: the engine decodes requests off the event loop, with bounds."""
        handlers = {}
        for method in pb.DESCRIPTOR.services_by_name["PolicyService"].methods:
            kind = {
                (False, False): grpc.unary_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = kind(getattr(self, method.name), request_deserializer=None, response_serializer=None)
        return grpc.method_handlers_generic_handler("policylink.v1.PolicyService", handlers)

    # -- sessions and auth ------------------------------------------------

    async def _authorize(self, context: aio.ServicerContext) -> dict[str, str]:
        return await checked_headers(self.engine, context, "grpc")

    async def _session(self, context: aio.ServicerContext) -> ClientSession:
        headers = await self._authorize(context)
        session_id = headers.get(SESSION_HEADER)
        if not session_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no '{SESSION_HEADER}' header: call GetMetadata first to open a session")
        entry = self._sessions.get(session_id)
        if entry is None or entry.peer != context.peer():
            # A session of another connection is refused exactly like an unknown one: ids do not leak.
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown session (closed, expired, or the server restarted); call GetMetadata again")
        entry.last_used = time.monotonic()
        return entry.session

    def _open(self, context: aio.ServicerContext) -> tuple[str, ClientSession]:
        session_id = secrets.token_urlsafe(24)
        session = self.engine.open_session(context.peer(), "grpc", self.max_message_bytes)
        self._sessions[session_id] = _GrpcSession(session, context.peer())
        return session_id, session

    def _drop(self, session_id: str) -> None:
        entry = self._sessions.pop(session_id, None)
        if entry is not None:
            self.engine.close_session(entry.session)

    def expire_idle(self) -> int:
        """Close sessions unused for ``session_idle_s``; returns how many."""
        cutoff = time.monotonic() - self.session_idle_s
        idle = [session_id for session_id, entry in self._sessions.items() if entry.last_used < cutoff]
        for session_id in idle:
            logger.info("%s: closing idle gRPC session", self._sessions[session_id].session.client_id)
            self._drop(session_id)
        return len(idle)

    # -- one call through the engine --------------------------------------

    async def _call(self, context: aio.ServicerContext, session: ClientSession, payload: bytes, decode: Callable[[bytes], Request], encode: Callable[[dict], bytes]) -> bytes:
        remaining = context.time_remaining()
        deadline = time.perf_counter() + remaining if remaining is not None else None
        outcome = await self.engine.handle(session, payload, decode, encode, deadline=deadline)
        if outcome.failure is not None:
            await abort(context, outcome.failure)
        return outcome.body

    # -- the service ------------------------------------------------------

    async def GetMetadata(self, request: bytes, context: aio.ServicerContext) -> bytes:  # noqa: N802
        headers = await self._authorize(context)
        session_id = headers.get(SESSION_HEADER)
        if session_id:
            session = await self._session(context)
        else:
            session_id, session = self._open(context)
        return convert.frame_to_metadata(self.engine.metadata_frame(session), session_id).SerializeToString()

    async def Configure(self, request: bytes, context: aio.ServicerContext) -> bytes:  # noqa: N802
        session = await self._session(context)
        session_id = call_headers(context)[SESSION_HEADER]
        return await self._call(context, session, request, _decode_configure, lambda reply: convert.frame_to_metadata(reply, session_id).SerializeToString())

    async def Infer(self, request: bytes, context: aio.ServicerContext) -> bytes:  # noqa: N802
        session = await self._session(context)
        decode, encode = _observation_codec()
        return await self._call(context, session, request, decode, encode)

    async def Stream(self, request_iterator: AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:  # noqa: N802
        headers = await self._authorize(context)
        own = not headers.get(SESSION_HEADER)
        session_id, session = self._open(context) if own else (headers[SESSION_HEADER], await self._session(context))
        try:
            async for request in request_iterator:
                # Each chunk carries the step of the observation it answers; a refused
                # observation gets a chunk with only ``error`` set, and the stream goes on.
                decode, encode = _observation_codec()
                outcome = await self.engine.handle(session, request, decode, encode)
                if outcome.failure is None:
                    yield outcome.body
                else:
                    kind = ErrorKind(outcome.failure.kind).value
                    yield pb.ActionChunk(step=decode.step, error=outcome.failure.message, error_kind=kind).SerializeToString()
        finally:
            if own:
                self._drop(session_id)

    async def Reset(self, request: bytes, context: aio.ServicerContext) -> bytes:  # noqa: N802
        session = await self._session(context)
        return await self._call(context, session, request, _decode_empty("reset", pb.ResetRequest), lambda reply: pb.ResetReply().SerializeToString())

    async def Close(self, request: bytes, context: aio.ServicerContext) -> bytes:  # noqa: N802
        await self._session(context)
        self._drop(call_headers(context)[SESSION_HEADER])
        return pb.CloseReply().SerializeToString()


class _ObservationDecoder:
    """Decodes an ``Observation`` and remembers its step for the reply."""

    def __init__(self) -> None:
        self.step = 0

    def __call__(self, payload: bytes) -> Request:
        message = convert.observation_message(payload)
        self.step = message.step
        return Request(convert.proto_to_observation(message))


def _observation_codec() -> tuple[_ObservationDecoder, Callable[[dict], bytes]]:
    decode = _ObservationDecoder()
    return decode, lambda reply: convert.chunk_to_proto(reply, decode.step).SerializeToString()


def _decode_configure(payload: bytes) -> Request:
    message = convert.parse_message(payload, pb.ConfigureRequest)
    fields: dict[str, Any] = {"policy_path": message.policy_path}
    fields.update({key: value for key, value in (("device", message.device), ("dtype", message.dtype), ("task", message.prompt)) if value})
    if message.rename_map:
        fields["rename_map"] = dict(message.rename_map)
    if message.fps:
        fields["fps"] = message.fps
    return Request(fields, "configure")


def _decode_empty(command: str, message_class: Any) -> Callable[[bytes], Request]:
    def decode(payload: bytes) -> Request:
        convert.parse_message(payload, message_class)
        return Request({}, command)

    return decode

