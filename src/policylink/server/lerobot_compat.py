"""LeRobot 0.4.4 async-inference compatibility: its ``transport.AsyncInference`` gRPC service.

LeRobot's ``robot_client`` (and anything built on its generated stub) can
drive this server unchanged:

- ``Ready``: a client (identified by its connection, ``context.peer()``)
  starts afresh;
- ``SendPolicyInstructions``: a pickled ``RemotePolicyConfig``; the model is
  loaded through the engine's cache, so a policy requested again (by this or
  another client) is reused, not reloaded;
- ``SendObservations``: a pickled ``TimedObservation`` in 2 MiB chunks
  (``TRANSFER_BEGIN`` / ``MIDDLE`` / ``END``); the newest one waits for
  ``GetActions`` (as in LeRobot's server, an observation whose step was
  already answered is skipped unless ``must_go``);
- ``GetActions``: runs the policy on the waiting observation and returns a
  pickled list of ``TimedAction`` (or ``Empty`` when no observation arrived
  within ``obs_timeout_s``).

The protocol carries pickles, which let a client run code on the server.
Every payload goes through :mod:`.safe_pickle` (bounded, on the engine's
decode threads); still, serve this only to trusted clients (the CLI binds
127.0.0.1 unless told otherwise). With an API key every call must carry
``authorization: Bearer KEY`` (LeRobot's client can add it with a gRPC
interceptor; see docs/protocols.md). Refusals use the gRPC adapter's status
codes and ``policylink-error-kind`` trailer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import numpy as np
import torch
from grpc import aio
from lerobot.async_inference.helpers import RemotePolicyConfig, TimedAction, TimedObservation
from lerobot.datasets.utils import build_dataset_frame
from lerobot.transport import services_pb2, services_pb2_grpc

from ..codec import DEFAULT_MAX_MESSAGE_BYTES
from ..errors import ProtocolError, RequestError, RequestTooLarge
from . import safe_pickle
from .app import ServesInBlock
from .engine import ClientSession, Engine, Request
from .grpc_server import abort, checked_headers, expire_periodically, grpc_server_options

__all__ = ["LeRobotCompatServer"]

logger = logging.getLogger("policylink.server")

_IMAGES_PREFIX = "observation.images."


@dataclasses.dataclass
class _Client:
    """One LeRobot robot client: its engine session, its policy instructions, its latest observation."""

    session: ClientSession
    config: RemotePolicyConfig | None = None
    pending: TimedObservation | None = None
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    answered_steps: set[int] = dataclasses.field(default_factory=set)
    last_used: float = dataclasses.field(default_factory=time.monotonic)


class LeRobotCompatServer(ServesInBlock, services_pb2_grpc.AsyncInferenceServicer):
    """Serves an :class:`Engine` to LeRobot's async-inference robot clients."""

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        obs_timeout_s: float = 2.0,
        client_idle_s: float = 600.0,
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.obs_timeout_s = obs_timeout_s
        self.client_idle_s = client_idle_s
        self._clients: dict[str, _Client] = {}
        self._server: aio.Server | None = None
        self._expiry: asyncio.Task | None = None

    async def start(self) -> None:
        safe_pickle.prepare()  # every module a pickle may name is imported now, not inside a request
        self._server = aio.server(options=grpc_server_options(self.max_message_bytes), maximum_concurrent_rpcs=self.engine.connections.limit)
        services_pb2_grpc.add_AsyncInferenceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if self.port == 0:
            raise OSError(f"LeRobot-compat server could not bind {self.host}")
        await self._server.start()
        self._expiry = asyncio.ensure_future(expire_periodically(self.expire_idle, self.client_idle_s))
        logger.warning("LeRobot async-inference server on %s:%d: it unpickles client payloads (restricted unpickler); serve trusted clients only", self.host, self.port)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        for client in self._clients.values():
            self.engine.close_session(client.session)
        self._clients.clear()

    # -- clients ----------------------------------------------------------

    async def _client(self, context: aio.ServicerContext) -> _Client:
        await checked_headers(self.engine, context, "lerobot")
        peer = context.peer()
        client = self._clients.get(peer)
        if client is None:
            client = self._clients[peer] = _Client(self.engine.open_session(peer, "lerobot", self.max_message_bytes))
        client.last_used = time.monotonic()
        return client

    def expire_idle(self) -> int:
        """Forget clients unused for ``client_idle_s``; returns how many."""
        cutoff = time.monotonic() - self.client_idle_s
        idle = [peer for peer, client in self._clients.items() if client.last_used < cutoff]
        for peer in idle:
            self.engine.close_session(self._clients.pop(peer).session)
        return len(idle)

    async def _refuse(self, context: aio.ServicerContext, client: _Client, exc: BaseException) -> NoReturn:
        await abort(context, self.engine.refuse(client.session, exc))
        raise AssertionError("unreachable: abort raises")

    # -- the service ------------------------------------------------------

    async def Ready(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        previous = self._clients.pop(context.peer(), None)
        if previous is not None:
            self.engine.close_session(previous.session)
        logger.info("%s: LeRobot client ready", (await self._client(context)).session.client_id)
        return services_pb2.Empty()

    async def SendPolicyInstructions(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        client = await self._client(context)
        try:
            config = await self.engine.decode(self._unpickler(RemotePolicyConfig), request.data)
            metadata = await self.engine.configure(client.session, _configure_request(config))
        except Exception as exc:
            await self._refuse(context, client, exc)
        if metadata.policy_type != config.policy_type:
            logger.warning("%s asked for a %s policy; %s is a %s policy: serving it anyway",
                           client.session.client_id, config.policy_type, config.pretrained_name_or_path, metadata.policy_type)
        client.config, client.pending = config, None
        client.answered_steps.clear()
        return services_pb2.Empty()

    async def SendObservations(self, request_iterator: AsyncIterator[Any], context: aio.ServicerContext) -> Any:  # noqa: N802
        client = await self._client(context)
        try:
            payload = await self._receive_chunks(request_iterator)
            observation = await self.engine.decode(self._unpickler(TimedObservation), payload)
        except Exception as exc:
            await self._refuse(context, client, exc)
        if observation.must_go or observation.get_timestep() not in client.answered_steps:
            client.pending = observation  # only the newest observation is worth an inference
            client.arrived.set()
        return services_pb2.Empty()

    def _unpickler(self, expected: type) -> Any:
        max_bytes = self.max_message_bytes

        def load(payload: bytes) -> Any:
            return safe_pickle.loads(payload, check=_expect(expected), max_bytes=max_bytes)

        return load

    async def _receive_chunks(self, request_iterator: AsyncIterator[Any]) -> bytes:
        """Reassemble one 2 MiB-chunked transfer (LeRobot's ``send_bytes_in_chunks``)."""
        buffer = bytearray()
        async for item in request_iterator:
            if item.transfer_state == services_pb2.TransferState.TRANSFER_BEGIN:
                buffer = bytearray(item.data)
            elif item.transfer_state in (services_pb2.TransferState.TRANSFER_MIDDLE, services_pb2.TransferState.TRANSFER_END):
                buffer += item.data
            else:
                raise ProtocolError(f"unknown transfer state {item.transfer_state}")
            if len(buffer) > self.max_message_bytes:
                raise RequestTooLarge(f"observation of more than {self.max_message_bytes} bytes refused")
            if item.transfer_state == services_pb2.TransferState.TRANSFER_END:
                return bytes(buffer)
        raise ProtocolError("the observation stream ended without TRANSFER_END")

    async def GetActions(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        client = await self._client(context)
        if client.pending is None:
            client.arrived.clear()
            try:
                await asyncio.wait_for(client.arrived.wait(), self.obs_timeout_s)
            except TimeoutError:
                return services_pb2.Empty()
        observation, client.pending = client.pending, None
        if observation is None:
            return services_pb2.Empty()
        if client.config is None or client.session.model is None:
            await self._refuse(context, client, RequestError("no policy loaded for this client: send SendPolicyInstructions first"))
        config, fps = client.config, client.session.model.metadata.fps or 30.0

        def decode(timed: TimedObservation) -> Request:
            return Request(_policy_observation(timed.get_observation(), config.lerobot_features))

        def encode(reply: dict[str, Any]) -> bytes:
            return pickle.dumps(_timed_actions(reply["actions"], observation, config.actions_per_chunk, fps))

        outcome = await self.engine.handle(client.session, observation, decode, encode)
        if outcome.failure is not None:
            await abort(context, outcome.failure)
        client.answered_steps.add(observation.get_timestep())
        return services_pb2.Actions(data=outcome.body)


def _timed_actions(actions: Any, observation: TimedObservation, actions_per_chunk: int, fps: float) -> list[TimedAction]:
    """The first ``actions_per_chunk`` rows as LeRobot ``TimedAction`` objects, timed from the observation."""
    rows = np.asarray(actions)[: max(1, actions_per_chunk)]
    t0, i0, dt = observation.get_timestamp(), observation.get_timestep(), 1.0 / fps
    return [TimedAction(timestamp=t0 + i * dt, timestep=i0 + i, action=torch.from_numpy(row.copy())) for i, row in enumerate(rows)]


def _expect(cls: type) -> Any:
    def check(value: Any) -> None:
        if not isinstance(value, cls):
            raise RequestError(f"expected a pickled {cls.__name__}, got {type(value).__name__}")

    return check


def _configure_request(config: RemotePolicyConfig) -> dict[str, Any]:
    """The engine's configure request for LeRobot's ``RemotePolicyConfig``."""
    rename = {
        str(source).removeprefix(_IMAGES_PREFIX): str(target).removeprefix(_IMAGES_PREFIX)
        for source, target in dict(config.rename_map or {}).items()
    }
    request: dict[str, Any] = {"policy_path": str(config.pretrained_name_or_path), "device": str(config.device or "auto")}
    if rename:
        request["rename_map"] = rename
    return request


def _policy_observation(raw: Any, lerobot_features: Any) -> dict[str, Any]:
    """LeRobot's raw robot observation (``{"shoulder.pos": 0.1, ..., "front": HxWx3}``) to policy keys."""
    if not isinstance(raw, dict):
        raise RequestError(f"a TimedObservation must wrap a dict, got {type(raw).__name__}")
    features = {key: value for key, value in dict(lerobot_features or {}).items() if isinstance(value, dict)}
    try:
        obs: dict[str, Any] = dict(build_dataset_frame(features, raw, prefix="observation"))
    except KeyError as exc:
        raise RequestError(f"observation lacks {exc.args[0]!r}, which the policy instructions' lerobot_features name") from None
    if "task" in raw:
        obs["task"] = str(raw["task"])
    return obs
