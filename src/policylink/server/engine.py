"""The serving engine: the one place where protocols meet policies.

Every wire protocol (WebSocket, gRPC, TCP) is a thin adapter that decodes a
request and calls :class:`Engine`. The engine

- keeps one :class:`ClientSession` per connection (its own policy state, its
  request counter, its timings),
- runs inference on worker threads, never on the event loop, so a slow model
  or a slow client does not stall the others,
- measures ``infer_ms`` after the policy returned its (host-side) arrays, i.e.
  once the accelerator has really finished.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import RequestError, ServerBusy
from ..types import Observation, Policy, PolicyMetadata, Reply, as_action_chunk
from .batching import BatchScheduler
from .metrics import ServerMetrics
from .models import ModelCache, model_key

__all__ = ["Engine", "ServedModel", "ClientSession", "ModelLoader", "BatchOptions", "COMMAND_KEY"]

logger = logging.getLogger("policylink.server")

#: Key that marks a request map as a command rather than an observation (every protocol).
COMMAND_KEY = "__command__"

#: Builds a policy from a configure request (policy path, device, dtype, ...).
ModelLoader = Callable[[Mapping[str, Any]], Policy]


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """How a served model batches and bounds its requests."""

    #: Largest batch across clients; 1 turns batching off.
    max_batch: int = 8
    #: How long the first request of a batch waits for company.
    batch_timeout_ms: float = 2.0
    #: Requests queued or running per model before new ones get "server busy".
    max_queue: int = 64


class ServedModel:
    """A loaded policy, the worker threads that run it, and its batch scheduler."""

    def __init__(self, policy: Policy, key: str | None = None, max_workers: int = 8, batching: BatchOptions | None = None) -> None:
        self.policy = policy
        self.key = key or policy.metadata.model_id
        self.batching = batching or BatchOptions()
        # A policy that keeps state or owns one accelerator runs one call at a time.
        workers = max_workers if policy.thread_safe else 1
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"infer-{self.key[-24:]}")
        self.scheduler = BatchScheduler(policy, self.run, self.batching.max_batch, self.batching.batch_timeout_ms) if self.batching.max_batch > 1 else None
        #: Requests of this model queued or running now.
        self.in_flight = 0

    @property
    def metadata(self) -> PolicyMetadata:
        return self.policy.metadata

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on this model's workers and await the result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def infer(self, session_policy: Policy, obs: Observation) -> tuple[Reply, dict[str, float]]:
        """Infer on the workers, batched with other clients' requests where the policy allows.

        Returns the reply and its timing split (``queue_ms``, ``infer_ms``,
        ``batch_size``). Raises :class:`ServerBusy` when the model's queue is full.
        """
        if self.in_flight >= self.batching.max_queue:
            raise ServerBusy(f"server busy: {self.in_flight} requests already queued for {self.key} (limit {self.batching.max_queue}); retry later")
        self.in_flight += 1
        try:
            key = self.policy.batch_key(obs) if self.scheduler is not None else None
            if key is not None:
                assert self.scheduler is not None
                return await self.scheduler.submit(session_policy, obs, key)
            queued = time.perf_counter()
            started, reply = await self.run(_timed_infer, session_policy, obs)
            done = time.perf_counter()
            return reply, {"queue_ms": (started - queued) * 1e3, "infer_ms": (done - started) * 1e3, "batch_size": 1}
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.policy.close()


def _timed_infer(policy: Policy, obs: Observation) -> tuple[float, Reply]:
    started = time.perf_counter()
    return started, policy.infer(obs)


@dataclasses.dataclass
class ClientSession:
    """Per-connection state: which model, its own policy state, counters."""

    client_id: str
    model: ServedModel | None = None
    policy: Policy | None = None
    requests: int = 0
    errors: int = 0
    prev_total_ms: float | None = None
    #: Prompt from the client's configure request, used when an observation carries none.
    task: str | None = None

    def attach(self, model: ServedModel | None) -> None:
        self.model = model
        self.policy = model.policy.session() if model else None


class Engine:
    """Routes requests from every protocol to the served models.

    ``policy`` is the model served to every client (``None`` starts an idle
    server). ``loader`` builds a policy from a client's configure request; an
    engine without one refuses configure requests. Models loaded on request
    live in :attr:`models`, a cache bounded by ``max_models`` and
    ``memory_budget_bytes`` (least recently used idle model evicted first).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        loader: ModelLoader | None = None,
        max_workers: int = 8,
        *,
        max_models: int = 2,
        memory_budget_bytes: int | None = None,
        batching: BatchOptions | None = None,
    ) -> None:
        self._max_workers = max_workers
        self.batching = batching or BatchOptions()
        self.default_model = ServedModel(policy, max_workers=max_workers, batching=self.batching) if policy else None
        self.loader = loader
        self.models = ModelCache(max_models, memory_budget_bytes, close=self._close_evicted)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self.sessions: dict[str, ClientSession] = {}
        #: Prometheus counters every protocol adapter reports to.
        self.metrics = ServerMetrics(self)

    # -- sessions ---------------------------------------------------------

    def open_session(self, peer: str = "") -> ClientSession:
        client_id = f"client-{next(self._ids)}" + (f"@{peer}" if peer else "")
        session = ClientSession(client_id)
        session.attach(self.default_model)
        self.sessions[client_id] = session
        logger.info("%s connected", client_id)
        return session

    def close_session(self, session: ClientSession) -> None:
        self.sessions.pop(session.client_id, None)
        self.models.release(session.model)
        logger.info("%s disconnected after %d requests (%d errors)", session.client_id, session.requests, session.errors)

    def metadata_frame(self, session: ClientSession) -> dict[str, Any]:
        """The first message a client receives: the policy metadata, or an idle notice."""
        if session.model is None:
            return {"status": "idle", "model_id": None, "message": "no model loaded; send a configure request"}
        return {"status": "ready", **session.model.metadata.to_dict()}

    @property
    def ready(self) -> bool:
        return self.default_model is not None

    # -- requests ---------------------------------------------------------

    async def infer(self, session: ClientSession, obs: Any) -> Reply:
        """Run one inference for ``session``; raises :class:`RequestError` for bad input."""
        if session.model is None or session.policy is None:
            raise RequestError("no model loaded on this server; send a configure request first")
        if not isinstance(obs, dict):
            raise RequestError(f"an observation must be a map of named fields, got {type(obs).__name__}")
        if session.task is not None and "task" not in obs and "prompt" not in obs:
            obs = {**obs, "task": session.task}
        session.requests += 1
        reply, timing = await session.model.infer(session.policy, obs)
        reply = _checked_reply(reply, session.model.metadata)
        timing = {key: round(value, 3) for key, value in timing.items()}
        if session.prev_total_ms is not None:
            timing["prev_total_ms"] = round(session.prev_total_ms, 3)
        reply["server_timing"] = {**reply.get("server_timing", {}), **timing}
        logger.info(
            "%s request #%d: infer %.1f ms, queue %.1f ms",
            session.client_id, session.requests, timing["infer_ms"], timing["queue_ms"],
        )
        return reply

    def record_total(self, session: ClientSession, total_ms: float) -> None:
        """Remember the full server-side time of the last request (sent as ``prev_total_ms``)."""
        session.prev_total_ms = total_ms

    async def reset(self, session: ClientSession) -> None:
        if session.model is not None and session.policy is not None:
            await session.model.run(session.policy.reset)

    async def command(self, session: ClientSession, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a command map (``{COMMAND_KEY: "reset" | "metadata" | "configure", ...}``) of any protocol."""
        command = request[COMMAND_KEY]
        if command == "reset":
            await self.reset(session)
            return {"ok": True}
        if command == "metadata":
            return self.metadata_frame(session)
        if command == "configure":
            metadata = await self.configure(session, request)
            return {"ok": True, "status": "ready", **metadata.to_dict()}
        raise RequestError(f"unknown command {command!r}; known: configure, metadata, reset")

    async def configure(self, session: ClientSession, request: Mapping[str, Any]) -> PolicyMetadata:
        """Load (or reuse) the model a client asks for and attach it to its session.

        The model is taken from :attr:`models` when the same checkpoint,
        device and dtype were loaded before. A ``task`` in the request becomes
        this client's default prompt. Load failures raise :class:`RequestError`.
        """
        if self.loader is None:
            raise RequestError("this server cannot load models on request (started without a model loader)")
        loader = self.loader
        key = model_key(request)
        self._loop = asyncio.get_running_loop()

        def build() -> ServedModel:
            return ServedModel(loader(request), key=key[0] or None, max_workers=self._max_workers, batching=self.batching)

        try:
            model = await asyncio.to_thread(self.models.acquire, key, build)
        except RequestError:
            raise
        except Exception as exc:  # a broken checkpoint must not look like a server crash
            logger.exception("%s: loading %s failed", session.client_id, key[0])
            raise RequestError(f"could not load model {key[0]!r}: {type(exc).__name__}: {exc}") from exc
        previous = session.model
        session.attach(model)
        self.models.release(previous)
        task = request.get("task")
        session.task = str(task) if task else None
        logger.info("%s configured %s (%s, %s)", session.client_id, key[0], key[1], key[2])
        return model.metadata

    def _close_evicted(self, model: ServedModel) -> None:
        """Close a model the cache evicted, on the event loop (its scheduler's tasks live there)."""
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:  # a worker thread: the load that triggered the eviction
                on_loop = False
            if not on_loop:
                loop.call_soon_threadsafe(model.close)
                return
        model.close()

    def close(self) -> None:
        if self.default_model is not None:
            self.default_model.close()
        self.models.close()


def _checked_reply(reply: Any, metadata: PolicyMetadata) -> Reply:
    """Make sure the policy produced ``{"actions": (horizon, action_dim) float32}``."""
    if not isinstance(reply, dict) or "actions" not in reply:
        raise RuntimeError(f"policy {metadata.model_id} returned {type(reply).__name__} without 'actions'")
    reply = dict(reply)
    reply["actions"] = as_action_chunk(reply["actions"], metadata.action_dim)
    if not np.isfinite(reply["actions"]).all():
        raise RuntimeError(f"policy {metadata.model_id} produced non-finite actions")
    return reply
