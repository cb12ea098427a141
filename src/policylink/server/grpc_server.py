"""Typed gRPC protocol (``policylink.v1.PolicyService``) on the asyncio event loop.

The schema is ``proto/policylink/proto/v1/policylink.proto``. A client

1. calls ``GetMetadata`` without a session header: the server opens a
   session and returns the policy metadata with its ``session_id``;
2. names that session in the ``policylink-session`` header of every later
   call (``Configure``, ``Infer``, ``Stream``, ``Reset``, ``Close``).

A ``Stream`` call without a session header gets a session of its own for the
duration of the stream; an observation it refuses is answered with a chunk
carrying only ``error`` (and its ``step``), and the stream goes on. Sessions left idle for ``session_idle_s`` are closed.

With an ``api_key`` every call must carry ``authorization: Bearer KEY``
(``UNAUTHENTICATED`` otherwise). Errors map to status codes: bad input
``INVALID_ARGUMENT``, a full queue ``RESOURCE_EXHAUSTED``, an unknown
session ``NOT_FOUND``, a failing policy ``INTERNAL`` ("inference failed:
..."), a request that is not valid protobuf ``INVALID_ARGUMENT`` ("request is
not a valid policylink.v1.Observation protobuf message"). The server keeps
serving every other call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc import aio

from ..codec import DEFAULT_MAX_MESSAGE_BYTES
from ..errors import ProtocolError, RequestError, ServerBusy
from ..proto import convert
from ..proto.v1 import policylink_pb2 as pb
from ..proto.v1 import policylink_pb2_grpc as pb_grpc  # noqa: F401  (the generated stub, for clients)
from .app import ServesInBlock
from .engine import ClientSession, Engine

__all__ = ["GrpcServer", "SESSION_HEADER"]

logger = logging.getLogger("policylink.server")

#: Call metadata key naming the client's session.
SESSION_HEADER = "policylink-session"


class _Malformed:
    """Stands in for a request that did not parse; the handler answers ``INVALID_ARGUMENT``."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request is not a valid {type_name} protobuf message ({error})"


def _lenient(message_class: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return _Malformed(message_class.DESCRIPTOR.full_name, exc)

    return parse


async def _check_parsed(request: Any, context: aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        logger.warning("%s: %s", context.peer(), request.message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


class GrpcServer(ServesInBlock, pb_grpc.PolicyServiceServicer):
    """Serves an :class:`Engine` over gRPC (``grpc.aio``).

    ``tls_cert`` / ``tls_key`` (PEM files) switch the port to TLS.
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
        self.host = host
        self.port = port
        self.api_key = api_key
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.max_message_bytes = max_message_bytes
        self.session_idle_s = session_idle_s
        self._sessions: dict[str, tuple[ClientSession, float]] = {}
        self._server: aio.Server | None = None

    @property
    def scheme(self) -> str:
        return "grpcs" if self.tls_cert else "grpc"

    async def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        self._server = aio.server(options=options)
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
        logger.info("gRPC server listening on %s://%s:%d", self.scheme, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        for session, _ in list(self._sessions.values()):
            self.engine.close_session(session)
        self._sessions.clear()

    def _handlers(self) -> grpc.GenericRpcHandler:
        """The service's handlers, with request parsing that reports malformed protobuf clearly.

        (The generated registration lets a parse failure surface as
        ``UNKNOWN: Unexpected DecodeError``; here it is ``INVALID_ARGUMENT``
        naming the expected message type.)
        """
        handlers = {}
        for method in pb.DESCRIPTOR.services_by_name["PolicyService"].methods:
            kind = {
                (False, False): grpc.unary_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = kind(
                getattr(self, method.name),
                request_deserializer=_lenient(message_factory.GetMessageClass(method.input_type)),
                response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
            )
        return grpc.method_handlers_generic_handler("policylink.v1.PolicyService", handlers)

    # -- sessions and auth ------------------------------------------------

    async def _authorize(self, context: aio.ServicerContext) -> dict[str, str]:
        headers = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (send 'authorization: Bearer KEY')")
        return headers

    async def _session(self, context: aio.ServicerContext, request: Any = None) -> ClientSession:
        await _check_parsed(request, context)
        headers = await self._authorize(context)
        session_id = headers.get(SESSION_HEADER)
        if not session_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no '{SESSION_HEADER}' header: call GetMetadata first to open a session")
        entry = self._sessions.get(session_id)
        if entry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {session_id!r} (closed, expired, or the server restarted); call GetMetadata again")
        self._sessions[session_id] = (entry[0], time.monotonic())
        return entry[0]

    def _open(self, context: aio.ServicerContext) -> ClientSession:
        self._expire_idle()
        session = self.engine.open_session(context.peer())
        self._sessions[session.client_id] = (session, time.monotonic())
        return session

    def _expire_idle(self) -> None:
        cutoff = time.monotonic() - self.session_idle_s
        for session_id, (session, last_used) in list(self._sessions.items()):
            if last_used < cutoff:
                logger.info("%s: closing idle gRPC session", session_id)
                del self._sessions[session_id]
                self.engine.close_session(session)

    async def _run(self, context: aio.ServicerContext, session: ClientSession, work: Any) -> Any:
        """Await ``work``; turn failures into gRPC status codes that name the problem."""
        try:
            return await work
        except Exception as exc:
            code, message = self._refusal(session, exc)
        await context.abort(code, message)

    def _refusal(self, session: ClientSession, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """Count and log a failed request; the status code and message that tell the client why."""
        if isinstance(exc, ServerBusy):
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        elif isinstance(exc, (RequestError, ProtocolError)):
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        else:  # a broken policy must not take the server down
            logger.error("%s: inference failed", session.client_id, exc_info=exc)
            code, message = grpc.StatusCode.INTERNAL, f"inference failed: {type(exc).__name__}: {exc}"
        self.engine.metrics.request_failed("grpc", exc)
        session.errors += 1
        logger.warning("%s: request refused: %s", session.client_id, message)
        return code, message

    # -- the service ------------------------------------------------------

    async def GetMetadata(self, request: pb.MetadataRequest, context: aio.ServicerContext) -> pb.Metadata:  # noqa: N802
        await _check_parsed(request, context)
        headers = await self._authorize(context)
        if headers.get(SESSION_HEADER):
            session = await self._session(context)
        else:
            session = self._open(context)
        return convert.frame_to_metadata(self.engine.metadata_frame(session), session.client_id)

    async def Configure(self, request: pb.ConfigureRequest, context: aio.ServicerContext) -> pb.Metadata:  # noqa: N802
        session = await self._session(context, request)
        options: dict[str, Any] = {"policy_path": request.policy_path}
        options.update({key: value for key, value in (("device", request.device), ("dtype", request.dtype), ("task", request.prompt)) if value})
        if request.rename_map:
            options["rename_map"] = dict(request.rename_map)
        if request.fps:
            options["fps"] = request.fps
        await self._run(context, session, self.engine.configure(session, options))
        return convert.frame_to_metadata(self.engine.metadata_frame(session), session.client_id)

    async def Infer(self, request: pb.Observation, context: aio.ServicerContext) -> pb.ActionChunk:  # noqa: N802
        session = await self._session(context, request)
        return await self._run(context, session, self._infer(session, request))

    async def _infer(self, session: ClientSession, request: pb.Observation) -> pb.ActionChunk:
        started = time.perf_counter()
        obs = convert.proto_to_observation(request)
        decode_ms = (time.perf_counter() - started) * 1e3
        reply = await self.engine.infer(session, obs)
        reply["server_timing"]["decode_ms"] = round(decode_ms, 3)
        self.engine.record_total(session, (time.perf_counter() - started) * 1e3)
        self.engine.metrics.request_done("grpc", reply, time.perf_counter() - started)
        return convert.chunk_to_proto(reply, request.step)

    async def Stream(self, request_iterator: AsyncIterator[pb.Observation], context: aio.ServicerContext) -> AsyncIterator[pb.ActionChunk]:  # noqa: N802
        headers = await self._authorize(context)
        own = not headers.get(SESSION_HEADER)
        session = self._open(context) if own else await self._session(context)
        try:
            async for request in request_iterator:
                # Each chunk carries the step of the observation it answers; a refused
                # observation gets a chunk with only ``error`` set, and the stream goes on.
                if isinstance(request, _Malformed):
                    yield pb.ActionChunk(error=request.message)
                    continue
                try:
                    yield await self._infer(session, request)
                except Exception as exc:
                    yield pb.ActionChunk(step=request.step, error=self._refusal(session, exc)[1])
        finally:
            if own:
                self._sessions.pop(session.client_id, None)
                self.engine.close_session(session)

    async def Reset(self, request: pb.ResetRequest, context: aio.ServicerContext) -> pb.ResetReply:  # noqa: N802
        session = await self._session(context, request)
        await self._run(context, session, self.engine.reset(session))
        return pb.ResetReply()

    async def Close(self, request: pb.CloseRequest, context: aio.ServicerContext) -> pb.CloseReply:  # noqa: N802
        session = await self._session(context, request)
        self._sessions.pop(session.client_id, None)
        self.engine.close_session(session)
        return pb.CloseReply()
