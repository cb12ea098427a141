"""Batching requests from many clients into one forward pass.

One :class:`BatchScheduler` per served model. Requests from every connection
(and every protocol) enter its queue; a single worker takes the oldest
request, waits up to ``batch_timeout_ms`` for more that can share its batch
(equal :meth:`~policylink.types.Policy.batch_key`), up to ``max_batch``, and
runs them as one forward pass on the model's thread (``prepare`` for each,
then ``infer_prepared``, by default ``infer_batch``). Requests that
cannot share a batch run in a later one.

Overlap: for a policy with its own :meth:`~policylink.types.Policy.prepare`,
each request's host-side work (mapping, resizing, normalising, tokenising,
copies to the device) starts on a preparation thread as soon as the request
arrives, so it runs while the model computes the batch before; the batch then
runs ``infer_prepared`` on what was prepared. A request whose preparation
fails gets that error alone.

A request whose client went away while it waited is cancelled and skipped.
If a batched call fails, its requests are retried one by one so that only
the request at fault gets the error.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

from ..types import Observation, Policy, Reply

__all__ = ["BatchScheduler"]

logger = logging.getLogger("policylink.server")

#: Runs a blocking function on the model's worker thread: ``await run(fn, *args)``.
Runner = Callable[..., Awaitable[Any]]


@dataclasses.dataclass
class _Request:
    session: Policy
    obs: Observation
    key: Hashable
    future: asyncio.Future
    enqueued: float
    #: The running preparation (overlap on): ``(prepared, prepare_ms)``, or the exception it raised.
    prepared: asyncio.Task | None = None


class BatchScheduler:
    """Forms batches of compatible requests for one model and runs them one batch at a time."""

    def __init__(
        self, policy: Policy, run: Runner, max_batch: int = 8, batch_timeout_ms: float = 2.0, prepare: Runner | None = None
    ) -> None:
        """``run`` runs a blocking function on the model's thread. ``prepare``, when given, runs one on the
        preparation thread: each request's :meth:`~policylink.types.Policy.prepare` then runs there on arrival
        (overlap); without it, preparation is part of the batch's call on the model's thread."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.policy = policy
        self.max_batch = max_batch
        self.batch_timeout_s = max(0.0, batch_timeout_ms) / 1e3
        self._run = run
        self._prepare = prepare
        self._queue: collections.deque[_Request] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        #: How many batches of each size ran (for tests and metrics).
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def overlaps(self) -> bool:
        """Whether requests are prepared on their own thread while the batch before runs."""
        return self._prepare is not None

    async def submit(self, session: Policy, obs: Observation, key: Hashable) -> tuple[Reply, dict[str, float]]:
        """Queue one request; returns its reply and timing (``queue_ms``, ``infer_ms``, ``batch_size``, and
        ``prepare_ms`` when preparation overlaps)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work(), name="policylink-batcher")
        request = _Request(session, obs, key, loop.create_future(), time.perf_counter())
        if self._prepare is not None:
            request.prepared = loop.create_task(self._prepare_one(session, obs))
        self._queue.append(request)
        assert self._arrived is not None
        self._arrived.set()
        return await request.future

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for request in self._queue:
            request.future.cancel()
            if request.prepared is not None:
                request.prepared.cancel()
        self._queue.clear()

    async def _prepare_one(self, session: Policy, obs: Observation) -> tuple[Any, float] | BaseException:
        """This request's preparation on the preparation thread; its exception is returned, to be its reply."""
        assert self._prepare is not None
        try:
            return await self._prepare(_timed_prepare, self.policy, session, obs)
        except Exception as exc:
            return exc

    # -- the worker -------------------------------------------------------

    async def _work(self) -> None:
        assert self._arrived is not None
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._gather_more(self._queue[0])
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _gather_more(self, first: _Request) -> None:
        """Wait until the batch is full or the oldest request has waited long enough."""
        assert self._arrived is not None
        while self._compatible_count(first.key) < self.max_batch:
            remaining = first.enqueued + self.batch_timeout_s - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _compatible_count(self, key: Hashable) -> int:
        return sum(1 for request in self._queue if request.key == key and not request.future.done())

    def _take_batch(self) -> list[_Request]:
        self._drop_cancelled()
        if not self._queue:
            return []
        key = self._queue[0].key
        batch, rest = [], collections.deque()
        for request in self._queue:
            if request.key == key and len(batch) < self.max_batch:
                batch.append(request)
            else:
                rest.append(request)
        self._queue = rest
        return batch

    def _drop_cancelled(self) -> None:
        if any(request.future.done() for request in self._queue):
            dropped = [request for request in self._queue if request.future.done()]
            self._queue = collections.deque(request for request in self._queue if not request.future.done())
            for request in dropped:
                if request.prepared is not None:
                    request.prepared.cancel()
            logger.info("dropped %d queued request(s) whose clients went away", len(dropped))

    async def _run_batch(self, batch: list[_Request]) -> None:
        prepare_ms: list[float | None] = [None] * len(batch)
        if self._prepare is None:
            call: tuple[Any, ...] = (self._infer, [r.session for r in batch], [r.obs for r in batch])
        else:
            batch, prepared, prepare_ms = await self._prepared(batch)
            if not batch:
                return
            call = (self._infer_prepared, [r.session for r in batch], prepared)
        started = time.perf_counter()
        try:
            replies = await self._run(*call)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, exception=exc)
                return
            logger.warning("a batch of %d failed (%s); retrying its requests one by one", len(batch), exc)
            for request in batch:
                await self._run_batch([request])
            return
        done = time.perf_counter()
        self.batch_sizes[len(batch)] += 1
        for request, reply, prepared_ms in zip(batch, replies, prepare_ms):
            timing = {"queue_ms": (started - request.enqueued) * 1e3, "infer_ms": (done - started) * 1e3, "batch_size": len(batch)}
            if prepared_ms is not None:
                timing["prepare_ms"] = prepared_ms
            _settle(request.future, result=(reply, timing))

    async def _prepared(self, batch: list[_Request]) -> tuple[list[_Request], list[Any], list[float | None]]:
        """The batch's prepared inputs (usually ready: prepared while the batch before ran).

        A request whose preparation failed gets its error now and leaves the batch.
        """
        kept: list[_Request] = []
        prepared: list[Any] = []
        prepare_ms: list[float | None] = []
        for request in batch:
            assert request.prepared is not None
            outcome = await request.prepared
            if isinstance(outcome, BaseException):
                _settle(request.future, exception=outcome)
            elif not request.future.done():
                kept.append(request)
                prepared.append(outcome[0])
                prepare_ms.append(outcome[1])
        return kept, prepared, prepare_ms

    def _infer(self, sessions: Sequence[Policy], observations: Sequence[Observation]) -> list[Reply]:
        prepared = [self.policy.prepare(session, obs) for session, obs in zip(sessions, observations)]
        return self._infer_prepared(sessions, prepared)

    def _infer_prepared(self, sessions: Sequence[Policy], prepared: Sequence[Any]) -> list[Reply]:
        return _checked(self.policy.infer_prepared(sessions, prepared), len(prepared))


def _checked(replies: list[Reply], expected: int) -> list[Reply]:
    if len(replies) != expected:
        raise RuntimeError(f"a batch of {expected} requests got {len(replies)} replies")
    return replies


def _timed_prepare(policy: Policy, session: Policy, obs: Observation) -> tuple[Any, float]:
    started = time.perf_counter()
    prepared = policy.prepare(session, obs)
    return prepared, (time.perf_counter() - started) * 1e3


def _settle(future: asyncio.Future, result: Any = None, exception: BaseException | None = None) -> None:
    if future.done():  # the client went away meanwhile
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
