"""The serving engine: the one request path every protocol shares.

Each wire protocol (WebSocket, gRPC, TCP, LeRobot-compat) only frames bytes:
it hands :meth:`Engine.handle` the payload of one request, a function that
decodes it into a :class:`Request`, and a function that encodes a reply. The
engine then

1. decodes on a small pool of decode threads (a hostile message costs its
   sender, not everyone), timed as ``decode_ms``; a message that is sure to
   decode cheaply (a few hundred values, a few MiB: every ordinary
   observation) is decoded on the event loop instead, which is faster than
   the hand-off to a thread;
2. answers commands (``reset``, ``metadata``, ``configure``) or runs the
   inference on the model's workers, batched across clients where the policy
   allows (``queue_ms``, ``infer_ms``, ``batch_size``);
3. drops the work when the client's deadline passes or the client goes away
   (the adapter cancels the call), so a backlog never builds behind a client
   that gave up;
4. checks and encodes the reply, records timings and Prometheus metrics for
   every protocol alike, and turns any failure into a :class:`Failure` — an
   :class:`~policylink.errors.ErrorKind` and a message — that the adapter
   renders in its own wire form.

Sessions (:class:`ClientSession`) keep each connection's own policy state,
counters and default prompt. Models come from one :class:`ModelCache`,
shared by every protocol; a session and each running request hold a
reference, so a model is never closed under a request, and closing happens
off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..codec import quick_unpackb
from ..compression import decodable_formats, decompress_images, has_images
from ..errors import (
    ErrorKind,
    ModelNotLoaded,
    NotAllowed,
    PolicyLinkError,
    RequestError,
    RequestExpired,
    ServerBusy,
)
from ..rtc.request import RTC_KEY, SEED_KEY, RTCRequest, parse_seed
from ..types import Observation, Policy, PolicyMetadata, Reply, as_action_chunk
from .auth import ApiKey
from .batching import BatchScheduler
from .connections import DEFAULT_MAX_CONNECTIONS, ConnectionBudget
from .metrics import ServerMetrics
from .models import ModelCache, model_key

__all__ = [
    "Engine",
    "ServedModel",
    "ClientSession",
    "ModelLoader",
    "BatchOptions",
    "Request",
    "Failure",
    "Outcome",
    "COMMAND_KEY",
    "TIMEOUT_KEY",
    "PROTOCOL_VERSION",
    "shorten",
]

logger = logging.getLogger("policylink.server")

#: Key that marks a request map as a command rather than an observation (every protocol).
COMMAND_KEY = "__command__"
#: Optional request key: how long the client waits for this reply, in ms; the server drops the work after that.
TIMEOUT_KEY = "__timeout_ms__"
#: Announced in the metadata frame; clients that see it may use :data:`TIMEOUT_KEY` and structured errors.
PROTOCOL_VERSION = "policylink.v1"
#: The commands every protocol understands.
COMMANDS = ("configure", "metadata", "reset")
#: Longest error message sent to a client; echoed input beyond it is cut.
MAX_MESSAGE_CHARS = 1000
#: Longest ``policy_path`` a configure request may name.
MAX_PATH_CHARS = 4096

#: Builds a policy from a configure request (policy path, device, dtype, ...).
ModelLoader = Callable[[Mapping[str, Any]], Policy]


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut (for echoing client input)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """How a served model batches and bounds its requests."""

    #: Largest batch across clients; 1 turns batching off.
    max_batch: int = 8
    #: How long the first request of a batch waits for company.
    batch_timeout_ms: float = 2.0
    #: Requests queued or running per model before new ones get "server busy".
    max_queue: int = 64
    #: Prepare each request on its own thread while the batch before runs (policies with a ``prepare`` step).
    overlap: bool = True


@dataclasses.dataclass
class Request:
    """One decoded request: an observation, or a command with its fields."""

    fields: dict[str, Any]
    #: ``None`` for an inference; else one of :data:`COMMANDS` (or an unknown name, refused later).
    command: str | None = None
    #: How long the client waits, in seconds, when it said so.
    timeout_s: float | None = None

    @classmethod
    def from_map(cls, value: Any) -> Request:
        """The request a msgpack map (WebSocket, TCP) carries; reserved keys are taken out."""
        if not isinstance(value, dict):
            raise RequestError(f"a request must be a msgpack map, got {type(value).__name__}")
        # Compressed camera frames are decoded here, on the decode threads (headers checked first).
        fields = decompress_images(dict(value))
        timeout_s = _timeout_field(fields.pop(TIMEOUT_KEY, None))
        command = fields.pop(COMMAND_KEY, None)
        if command is not None and not isinstance(command, str):
            raise RequestError(f"'{COMMAND_KEY}' must be a string, got {type(command).__name__}")
        return cls(fields, command, timeout_s)

    @classmethod
    def quick_from_msgpack(cls, data: Any) -> Request | None:
        """The request in msgpack ``data`` when it decodes cheaply (see :func:`~policylink.codec.quick_unpackb`)
        and carries no compressed images; ``None`` sends it to the decode threads."""
        if not isinstance(data, (bytes, bytearray)):
            return None
        value = quick_unpackb(data)
        if value is None or has_images(value):
            return None
        return cls.from_map(value)


def _timeout_field(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RequestError(f"'{TIMEOUT_KEY}' must be a positive number of milliseconds, got {shorten(repr(value), 50)}")
    return float(value) / 1e3


@dataclasses.dataclass(frozen=True)
class Failure:
    """A refused or failed request, as data: what kind, and a message for people."""

    kind: ErrorKind
    message: str


@dataclasses.dataclass
class Outcome:
    """What :meth:`Engine.handle` gives back: the encoded reply, or a failure."""

    body: Any = None
    failure: Failure | None = None


class ServedModel:
    """A loaded policy, the worker threads that run it, and its batch scheduler."""

    def __init__(self, policy: Policy, key: str | None = None, max_workers: int = 8, batching: BatchOptions | None = None) -> None:
        self.policy = policy
        self.key = key or policy.metadata.model_id
        self.batching = batching or BatchOptions()
        # A policy that keeps state or owns one accelerator runs one call at a time.
        workers = max_workers if policy.thread_safe else 1
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"infer-{self.key[-24:]}")
        self._preparer: concurrent.futures.ThreadPoolExecutor | None = None
        self.scheduler: BatchScheduler | None = None
        if self.batching.max_batch > 1:
            prepare = None
            if self.batching.overlap and _prepares(policy):
                # One thread: preparation uses the policy's pre-processor (tokenizers are not thread-safe).
                self._preparer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{self.key[-24:]}")
                prepare = self._run_preparation
            self.scheduler = BatchScheduler(policy, self.run, self.batching.max_batch, self.batching.batch_timeout_ms, prepare=prepare)
        #: Requests of this model queued or running now.
        self.in_flight = 0

    @property
    def metadata(self) -> PolicyMetadata:
        return self.policy.metadata

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on this model's workers and await the result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run_preparation(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._preparer is not None
        return await asyncio.get_running_loop().run_in_executor(self._preparer, fn, *args)

    async def infer(self, session_policy: Policy, obs: Observation, deadline: float | None = None) -> tuple[Reply, dict[str, float]]:
        """Infer on the workers, batched with other clients' requests where the policy allows.

        Returns the reply and its timing split (``queue_ms``, ``infer_ms``,
        ``batch_size``). Raises :class:`ServerBusy` when the model's queue is
        full, :class:`RequestExpired` when ``deadline`` (``perf_counter``
        time) passes first; the request then leaves the queue without running.
        """
        if self.in_flight >= self.batching.max_queue:
            raise ServerBusy(f"server busy: {self.in_flight} requests already queued for {shorten(self.key, 80)} (limit {self.batching.max_queue}); retry later")
        self.in_flight += 1
        try:
            if deadline is None:
                return await self._infer(session_policy, obs)
            remaining = deadline - time.perf_counter()
            try:
                if remaining <= 0:  # never hand an expired request to a worker that might start it at once
                    raise TimeoutError
                # A timeout context cancels the wait without a task of its own.
                async with asyncio.timeout(remaining):
                    return await self._infer(session_policy, obs)
            except TimeoutError:
                raise RequestExpired("the client's deadline passed before the policy could answer; the request was dropped") from None
        finally:
            self.in_flight -= 1

    async def _infer(self, session_policy: Policy, obs: Observation) -> tuple[Reply, dict[str, float]]:
        key = self.policy.batch_key(obs) if self.scheduler is not None else None
        if key is not None:
            assert self.scheduler is not None
            return await self.scheduler.submit(session_policy, obs, key)
        queued = time.perf_counter()
        started, reply = await self.run(_timed_infer, session_policy, obs)
        done = time.perf_counter()
        return reply, {"queue_ms": (started - queued) * 1e3, "infer_ms": (done - started) * 1e3, "batch_size": 1}

    async def aclose(self) -> None:
        """Stop the scheduler (on the loop), then close the policy on a thread once its running calls are done."""
        if self.scheduler is not None:
            self.scheduler.close()
        await asyncio.to_thread(self._close_policy)

    def close(self) -> None:
        """Blocking variant of :meth:`aclose`, for when no event loop runs."""
        if self.scheduler is not None:
            self.scheduler.close()
        self._close_policy()

    def _close_policy(self) -> None:
        if self._preparer is not None:
            self._preparer.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.policy.close()


def _prepares(policy: Policy) -> bool:
    """Whether ``policy`` has a preparation step of its own (worth a thread that overlaps the model's)."""
    return type(policy).prepare is not Policy.prepare


def _timed_infer(policy: Policy, obs: Observation) -> tuple[float, Reply]:
    started = time.perf_counter()
    return started, policy.infer(obs)


@dataclasses.dataclass
class ClientSession:
    """Per-connection state: which model, its own policy state, counters."""

    client_id: str
    protocol: str = ""
    model: ServedModel | None = None
    policy: Policy | None = None
    requests: int = 0
    errors: int = 0
    prev_total_ms: float | None = None
    #: Prompt from the client's configure request, used when an observation carries none.
    task: str | None = None
    #: The largest request this client's protocol accepts (announced in the metadata frame).
    max_message_bytes: int | None = None
    closed: bool = False

    def attach(self, model: ServedModel | None) -> None:
        self.model = model
        self.policy = model.policy.session() if model else None


class Engine:
    """Routes requests from every protocol to the served models.

    ``policy`` is the model served to every client (``None`` starts an idle
    server); ``policy_request`` is the configure request that would load it
    (``{"policy_path": ..., "device": ...}``), so that a client configuring
    the same checkpoint shares it. ``loader`` builds a policy from a client's
    configure request; an engine without one refuses configure requests.
    Models live in :attr:`models`, a cache bounded by ``max_models`` and
    ``memory_budget_bytes``. ``model_roots`` limits configure to checkpoints
    under those folders. ``api_key`` locks every port; ``max_connections``
    bounds WebSocket + TCP connections.
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
        policy_request: Mapping[str, Any] | None = None,
        model_roots: Sequence[str | os.PathLike] = (),
        api_key: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        decode_workers: int | None = None,
        resolve_device: Callable[[str], str] | None = None,
        estimate_bytes: Callable[[Mapping[str, Any]], int] | None = None,
        warming: bool = False,
    ) -> None:
        self._max_workers = max_workers
        self.batching = batching or BatchOptions()
        self.loader = loader
        self.resolve_device = resolve_device
        self.estimate_bytes = estimate_bytes
        self.model_roots = tuple(Path(os.path.realpath(root)) for root in model_roots)
        self.auth = ApiKey(api_key)
        self.connections = ConnectionBudget(max_connections)
        self.models = ModelCache(max_models, memory_budget_bytes, close=self._close_evicted)
        self.default_model: ServedModel | None = None
        #: Set once the served model is loaded and warmed (at once without ``warming``); clients wait for it.
        self._ready = threading.Event()
        self._ready_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._ready_lock = threading.Lock()
        #: Requests being answered now (every protocol); a draining server waits for zero.
        self.in_flight = 0
        self._replying = 0  # requests taken by an adapter whose reply is not sent yet
        self._idle: asyncio.Event | None = None
        #: Set by :meth:`drain`: new requests are refused while the running ones finish.
        self.draining = False
        # For the periodic summary: answered requests' durations and refusals since the last one.
        self._window_started = time.monotonic()
        self._window_totals: list[float] = []
        self._window_errors = 0
        self._answered = 0
        if policy is not None:
            self.install(policy, policy_request, ready=not warming)
        elif not warming:
            self._ready.set()
        #: Compressed image formats requests may carry (announced in the metadata; none without a JPEG decoder).
        self.image_codecs = decodable_formats()
        self._decoder = concurrent.futures.ThreadPoolExecutor(decode_workers or min(4, os.cpu_count() or 2), thread_name_prefix="policylink-decode")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Future] = set()
        self._ids = itertools.count(1)
        self.sessions: dict[str, ClientSession] = {}
        #: Prometheus counters every protocol adapter reports to.
        self.metrics = ServerMetrics(self)

    # -- sessions ---------------------------------------------------------

    def open_session(self, peer: str = "", protocol: str = "", max_message_bytes: int | None = None) -> ClientSession:
        client_id = f"client-{next(self._ids)}" + (f"@{peer}" if peer else "")
        session = ClientSession(client_id, protocol, max_message_bytes=max_message_bytes)
        session.attach(self.default_model)
        self.models.retain(self.default_model)
        self.sessions[client_id] = session
        logger.info("%s connected", client_id)
        return session

    def close_session(self, session: ClientSession) -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.client_id, None)
        self.models.release(session.model)
        logger.info("%s disconnected after %d requests (%d errors)", session.client_id, session.requests, session.errors)

    def summary(self) -> str:
        """One line on the time since the last summary: clients, requests, errors, latency (then starts a new window)."""
        seconds = time.monotonic() - self._window_started
        totals = sorted(self._window_totals)
        line = f"summary: {len(self.sessions)} client(s), {len(totals)} request(s) in the last {seconds:.0f} s, {self._window_errors} refused"
        if totals:
            line += f", p50 {totals[len(totals) // 2] * 1e3:.1f} ms, p99 {totals[min(len(totals) - 1, int(len(totals) * 0.99))] * 1e3:.1f} ms"
        line += f"; {self._answered} answered since start"
        self._window_started, self._window_totals, self._window_errors = time.monotonic(), [], 0
        return line

    def metadata_frame(self, session: ClientSession) -> dict[str, Any]:
        """The first message a client receives: the policy metadata, or an idle notice.

        Both carry ``protocol`` (``policylink.v1``) and ``max_message_bytes``,
        so a client can refuse an oversized request before sending it.
        """
        server = {"protocol": PROTOCOL_VERSION, "max_message_bytes": session.max_message_bytes, "image_codecs": self.image_codecs}
        if session.model is None:
            return {"status": "idle", "model_id": None, "message": "no model loaded; send a configure request", **server}
        return {"status": "ready", **session.model.metadata.to_dict(), **server}

    def install(self, policy: Policy, policy_request: Mapping[str, Any] | None = None, *, ready: bool = True) -> None:
        """Serve ``policy`` to every client from now on; a warming server becomes ready (unless ``ready=False``)."""
        self.default_model = ServedModel(policy, max_workers=self._max_workers, batching=self.batching)
        key = model_key(policy_request) if policy_request else ("", "builtin", "", policy.metadata.model_id)
        self.models.pin(key, self.default_model)
        logger.info("serving %s", policy.metadata.model_id)
        if ready:
            self.set_ready()

    def set_ready(self) -> None:
        """Warm-up is over: clients waiting for their metadata frame get it (any thread)."""
        with self._ready_lock:
            self._ready.set()
            waiters, self._ready_waiters = self._ready_waiters, []
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_set_result, waiter)
        logger.info("ready")

    @property
    def ready(self) -> bool:
        """Whether a model is served to new clients (loaded and warmed); ``False`` for an idle server or while draining."""
        return self.default_model is not None and self._ready.is_set() and not self.draining

    @property
    def accepting(self) -> bool:
        """Readiness (``/readyz``): warm-up is over (an idle server is ready for configure requests) and not draining."""
        return self._ready.is_set() and not self.draining

    async def wait_ready(self) -> None:
        """Return once the served model is loaded (at once on a ready server): new connections wait here during warm-up."""
        if self._ready.is_set():
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        with self._ready_lock:
            if self._ready.is_set():
                return
            self._ready_waiters.append((loop, waiter))
        await waiter

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait up to ``timeout_s`` for the running ones; ``True`` if none is left."""
        self.draining = True
        if self.in_flight or self._replying:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                logger.warning("drain: %d request(s) still running after %.0f s; closing anyway", self.in_flight, timeout_s)
                return False
        return True

    def loaded_model_ids(self) -> list[str]:
        return [model.metadata.model_id for model in self.models.models()]

    # -- the request path -------------------------------------------------

    async def handle(
        self,
        session: ClientSession,
        payload: Any,
        decode: Callable[[Any], Request],
        encode: Callable[[dict[str, Any]], Any] | None = None,
        *,
        deadline: float | None = None,
        quick_decode: Callable[[Any], Request | None] | None = None,
    ) -> Outcome:
        """Decode, answer and encode one request of ``session``; failures come back as data.

        ``decode(payload)`` runs on a decode thread, unless
        ``quick_decode(payload)``, called on the event loop, returns the
        request (it must return ``None`` for anything it cannot decode in a
        few tens of microseconds). ``deadline``
        (``time.perf_counter()`` seconds) is the protocol's own deadline, if
        it has one; a request's ``__timeout_ms__`` sets one too. Cancelling
        the call (the client went away) drops the work wherever it is.
        """
        received = time.perf_counter()
        protocol = session.protocol
        if self.draining:
            return Outcome(failure=self.refuse(session, ServerBusy("server shutting down: it finishes running requests and takes no new ones; reconnect")))
        self.in_flight += 1
        try:
            return await self._handle(session, payload, decode, encode, deadline, quick_decode, received, protocol)
        finally:
            self.in_flight -= 1
            self._signal_if_idle()

    def begin(self) -> None:
        """An adapter took a request whose reply it will send: a draining server waits for :meth:`end`."""
        self._replying += 1

    def end(self) -> None:
        self._replying -= 1
        self._signal_if_idle()

    def _signal_if_idle(self) -> None:
        if not self.in_flight and not self._replying and self._idle is not None:
            self._idle.set()

    async def _handle(self, session: ClientSession, payload: Any, decode: Callable[[Any], Request], encode: Callable[[dict[str, Any]], Any] | None,
                      deadline: float | None, quick_decode: Callable[[Any], Request | None] | None, received: float, protocol: str) -> Outcome:
        try:
            await self.wait_ready()
            if session.model is None and self.default_model is not None:  # opened during warm-up (gRPC, LeRobot's protocol)
                session.attach(self.default_model)
                self.models.retain(self.default_model)
            request, decode_ms = await self._decode(decode, payload, quick_decode)
            if request.timeout_s is not None:
                own = received + request.timeout_s
                deadline = own if deadline is None else min(deadline, own)
            reply = await self._answer(session, request, deadline)
            if request.command is None:
                reply["server_timing"]["decode_ms"] = round(decode_ms, 3)
            body = encode(reply) if encode is not None else reply
        except Exception as exc:
            return Outcome(failure=self.refuse(session, exc))
        total_s = time.perf_counter() - received
        self._answered += 1
        if len(self._window_totals) < 100_000:
            self._window_totals.append(total_s)
        if request.command is None:
            session.prev_total_ms = total_s * 1e3
        self.metrics.request_done(protocol, reply, total_s)
        return Outcome(body=body)

    async def decode(self, decode: Callable[[Any], Any], payload: Any) -> Any:
        """Run a decoder on the decode threads (for adapters that decode outside :meth:`handle`)."""
        return (await self._decode(decode, payload))[0]

    async def _decode(self, decode: Callable[[Any], Any], payload: Any, quick_decode: Callable[[Any], Any] | None = None) -> tuple[Any, float]:
        if quick_decode is not None:
            started = time.perf_counter()
            request = quick_decode(payload)
            if request is not None:
                return request, (time.perf_counter() - started) * 1e3
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, _timed_decode, decode, payload)

    def refuse(self, session: ClientSession, exc: BaseException) -> Failure:
        """Count, log and describe a failed request: the :class:`Failure` its adapter sends."""
        if isinstance(exc, PolicyLinkError):
            kind, message = exc.kind, str(exc)
        else:  # a broken policy must not take the server down
            kind, message = ErrorKind.INTERNAL, f"inference failed: {type(exc).__name__}: {exc}"
            logger.error("%s: request failed", session.client_id, exc_info=exc)
        message = shorten(message, MAX_MESSAGE_CHARS)
        session.errors += 1
        self._window_errors += 1
        self.metrics.request_failed(session.protocol, kind)
        logger.warning("%s: request #%d refused (%s): %s", session.client_id, session.requests, kind.value, message)
        return Failure(kind, message)

    async def _answer(self, session: ClientSession, request: Request, deadline: float | None) -> dict[str, Any]:
        if request.command is None:
            return await self.infer(session, request.fields, deadline)
        return await self.command(session, request.command, request.fields)

    async def infer(self, session: ClientSession, obs: Any, deadline: float | None = None) -> Reply:
        """Run one inference for ``session``; raises a :class:`PolicyLinkError` for a refused request."""
        model, policy = session.model, session.policy
        if model is None or policy is None:
            raise ModelNotLoaded("no model loaded for this client; send a configure request first")
        if not isinstance(obs, dict):
            raise RequestError(f"an observation must be a map of named fields, got {type(obs).__name__}")
        if session.task is not None and "task" not in obs and "prompt" not in obs:
            obs = {**obs, "task": session.task}
        obs = _sampling_fields(obs, model.metadata)
        session.requests += 1
        self.models.retain(model)  # the model stays loaded until this request is done
        try:
            reply, timing = await model.infer(policy, obs, deadline)
        finally:
            self.models.release(model)
        reply = _checked_reply(reply, model.metadata)
        timing = {key: round(value, 3) for key, value in timing.items()}
        if session.prev_total_ms is not None:
            timing["prev_total_ms"] = round(session.prev_total_ms, 3)
        reply["server_timing"] = {**reply.get("server_timing", {}), **timing}
        logger.debug("%s request #%d: infer %.1f ms, queue %.1f ms", session.client_id, session.requests, timing["infer_ms"], timing["queue_ms"])
        return reply

    async def reset(self, session: ClientSession) -> None:
        if session.model is not None and session.policy is not None:
            await session.model.run(session.policy.reset)

    async def command(self, session: ClientSession, command: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a command (``reset``, ``metadata``, ``configure``) of any protocol."""
        if command == "reset":
            await self.reset(session)
            return {"ok": True}
        if command == "metadata":
            return self.metadata_frame(session)
        if command == "configure":
            await self.configure(session, fields)
            return {"ok": True, **self.metadata_frame(session)}
        raise RequestError(f"unknown command {shorten(repr(command), 60)}; known: {', '.join(COMMANDS)}")

    # -- configure --------------------------------------------------------

    async def configure(self, session: ClientSession, request: Mapping[str, Any]) -> PolicyMetadata:
        """Load (or reuse) the model a client asks for and attach it to its session.

        The model is taken from :attr:`models` when the same checkpoint,
        device and dtype were loaded before. A ``task`` in the request becomes
        this client's default prompt. If the client goes away while the model
        loads, the load finishes (for the next client) and its reference is
        released.
        """
        if self.loader is None:
            raise RequestError("this server cannot load models on request (started without a model loader)")
        request = self._checked_configure(request)
        self._loop = asyncio.get_running_loop()
        pending = asyncio.ensure_future(asyncio.to_thread(self._acquire, request))
        try:
            model = await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(self._release_orphan)
            raise
        previous = session.model
        session.attach(model)
        self.models.release(previous)
        task = request.get("task")
        session.task = str(task) if task else None
        logger.info("%s configured %s (%s, %s)", session.client_id, shorten(model.key, 120), request.get("device") or "auto", request.get("dtype") or "float32")
        return model.metadata

    def preload(self, request: Mapping[str, Any]) -> None:
        """Blocking: load the checkpoint a configure request names into the model cache, for clients to come.

        It stays cached (shared by every client that configures it) until
        evicted. Checked like a configure request (``--model-root``).
        """
        if self.loader is None:
            raise RequestError("this server cannot load models on request (started without a model loader)")
        self.models.release(self._acquire(self._checked_configure(request)))

    def _release_orphan(self, pending: asyncio.Future) -> None:
        """A configure whose client left while it loaded: give its reference back."""
        if not pending.cancelled() and pending.exception() is None:
            self.models.release(pending.result())

    def _checked_configure(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The configure fields, typed and bounded; ``policy_path`` resolved under ``--model-root``."""
        fields = dict(request)
        path = fields.get("policy_path")
        if not path or not isinstance(path, str):
            raise RequestError("configure needs 'policy_path': the checkpoint directory on the server")
        if len(path) > MAX_PATH_CHARS:
            raise RequestError(f"'policy_path' is {len(path)} characters long (limit {MAX_PATH_CHARS})")
        for name in ("device", "dtype", "task"):
            value = fields.get(name)
            if value is not None and not isinstance(value, str):
                raise RequestError(f"configure '{name}' must be a string, got {type(value).__name__}")
        if self.model_roots:
            fields["policy_path"] = self._under_roots(path)
        return fields

    def _under_roots(self, path: str) -> str:
        """``path`` resolved inside one of the model roots; :class:`NotAllowed` otherwise (existence not revealed)."""
        candidates = [Path(path)] if os.path.isabs(path) else [root / path for root in self.model_roots]
        for candidate in candidates:
            resolved = Path(os.path.realpath(candidate))
            if any(resolved == root or root in resolved.parents for root in self.model_roots):
                return str(resolved)
        raise NotAllowed("policy path not allowed: this server loads checkpoints only from its --model-root folders")

    def _acquire(self, request: Mapping[str, Any]) -> ServedModel:
        """Blocking: the cached or freshly loaded model for a configure request (runs on a thread)."""
        assert self.loader is not None
        loader = self.loader
        device = self.resolve_device(request.get("device") or "auto") if self.resolve_device else None
        key = model_key(request, device)
        estimate = self.estimate_bytes(request) if self.estimate_bytes else 0

        def build() -> ServedModel:
            try:
                policy = loader(request)
            except PolicyLinkError:
                raise
            except Exception as exc:  # a broken checkpoint must not look like a server crash
                logger.exception("loading %s failed", shorten(key[0], 120))
                raise RequestError(f"could not load model {shorten(key[0])!r}: {type(exc).__name__}: {exc}") from exc
            return ServedModel(policy, key=key[0] or None, max_workers=self._max_workers, batching=self.batching)

        return self.models.acquire(key, build, estimate)

    def _close_evicted(self, model: ServedModel) -> None:
        """Close an evicted model off the event loop, after its running requests (may be called from any thread)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            model.close()
            return

        def start() -> None:
            task = asyncio.ensure_future(model.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        loop.call_soon_threadsafe(start)

    async def aclose(self) -> None:
        """Close every model (off the event loop) and the decode threads."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for model in self.models.clear():
            try:
                await model.aclose()
            except Exception:
                logger.exception("closing model %s failed", model.key)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Blocking variant of :meth:`aclose` for use outside an event loop."""
        for model in self.models.clear():
            model.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)


def _set_result(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _timed_decode(decode: Callable[[Any], Any], payload: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    return decode(payload), (time.perf_counter() - started) * 1e3


def _sampling_fields(obs: Observation, metadata: PolicyMetadata) -> Observation:
    """The observation with its real-time-chunking fields and noise seed checked (typed), or taken out.

    The policy finds an :class:`~policylink.rtc.RTCRequest` under
    :data:`~policylink.rtc.RTC_KEY` only when its metadata announces RTC
    support; for other policies the fields are ignored (the metadata says so).
    """
    if RTC_KEY not in obs and SEED_KEY not in obs:
        return obs
    obs = dict(obs)
    fields = obs.pop(RTC_KEY, None)
    rtc = None if fields is None else RTCRequest.from_wire(fields)
    seed = parse_seed(obs.pop(SEED_KEY, None))
    if rtc is not None and metadata.rtc is not None:
        rtc.check(metadata.rtc, metadata.action_dim, metadata.horizon)
        obs[RTC_KEY] = rtc
    if seed is not None:
        obs[SEED_KEY] = seed
    return obs


def _checked_reply(reply: Any, metadata: PolicyMetadata) -> Reply:
    """Make sure the policy produced ``{"actions": (horizon, action_dim) float32}``."""
    if not isinstance(reply, dict) or "actions" not in reply:
        raise RuntimeError(f"policy {metadata.model_id} returned {type(reply).__name__} without 'actions'")
    reply = dict(reply)
    reply["actions"] = as_action_chunk(reply["actions"], metadata.action_dim)
    if not np.isfinite(reply["actions"]).all():
        raise RuntimeError(f"policy {metadata.model_id} produced non-finite actions")
    return reply
