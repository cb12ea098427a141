"""The action executor: a fixed-rate control loop that executes action chunks.

Every tick the loop applies one action to the environment. Actions come from
a queue filled with chunks from the policy server; requests run on a
background thread, so a slow server never blocks the loop: when the queue is
empty the robot *holds* its last command (a stalled tick) instead.

Modes (:attr:`ExecutorConfig.mode`):

``sync``
    Ask for a chunk when the queue is empty, execute its first
    ``n_action_steps`` actions, ask again. The robot holds while each
    request is in flight.
``async``
    Ask for the next chunk while the current one still runs, as soon as the
    queue falls to ``threshold * n_action_steps`` actions (or to the recent
    latency estimate plus one tick, whichever is larger, when
    ``adaptive_threshold`` is on).

Latency compensation: every request carries the control step of its
observation (key ``step``), and every chunk is stamped with it; when the
chunk arrives at a later step, the actions for steps already past are
dropped, exactly as many as elapsed. Overlapping chunks are combined by a
:class:`~policylink.runtime.merging.MergeRule`.

Safety: every chunk is validated before it is queued (a rejected chunk is
reported and never executed); every action passes the safety filters; a
chunk whose observation is older than the watchdog deadline is stale and
rejected, and when no fresh action came for that long the loop reports a
watchdog trip while it keeps holding the last safe command.

The executor is a :class:`~policylink.runtime.events.LoopControl` (start /
stop / reset from any thread) and calls its listeners from the control thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..envs.base import Env, StepResult
from ..types import Observation
from .clock import Clock, RealTimeClock
from .events import ChunkEvent, EpisodeEvent, LoopListener, StepEvent
from .filters import ChunkRejected, ChunkValidator, FilterChain, ReadyPose
from .merging import LatestOnly, MergeRule, make_merge_rule
from .stats import LatencyEstimator, LoopStats

__all__ = ["Executor", "ExecutorConfig", "MODES"]

logger = logging.getLogger("policylink.runtime")

MODES = ("sync", "async")

#: Turns an observation into a ``(horizon, action_dim)`` chunk (``PolicyClient.infer``).
InferFn = Callable[[Observation], Any]


@dataclasses.dataclass
class ExecutorConfig:
    """How chunks are executed."""

    mode: str = "async"
    fps: float = 30.0
    #: Actions used from each chunk; ``None``: the whole chunk.
    n_action_steps: int | None = None
    #: Async: request when this fraction of ``n_action_steps`` is left in the queue.
    threshold: float = 0.5
    #: Async: also request early enough for the recent latency estimate.
    adaptive_threshold: bool = True
    #: Drop the actions whose step passed while the request ran.
    compensate: bool = True
    merge: MergeRule | str = "latest"
    #: Seconds without a fresh action before the watchdog trips; older chunks are stale.
    watchdog_s: float = 1.0
    #: Steps per episode (``None``: until the environment ends the episode).
    max_steps: int | None = None
    #: Put the control step into each request (key ``step``).
    send_step: bool = True
    #: Language instruction added to observations without one.
    task: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.n_action_steps is not None and self.n_action_steps < 1:
            raise ValueError(f"n_action_steps must be at least 1, got {self.n_action_steps}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.watchdog_s <= 0:
            raise ValueError(f"watchdog_s must be positive, got {self.watchdog_s}")
        if isinstance(self.merge, str):
            self.merge = make_merge_rule(self.merge)


@dataclasses.dataclass
class _Request:
    future: concurrent.futures.Future
    chunk_id: int
    obs_step: int
    sent_tick: int
    sent_time: float
    generation: int


class Executor:
    """Runs ``env`` with actions from ``policy`` at a fixed rate.

    ``policy`` is a :class:`~policylink.client.PolicyClient` (or anything with
    ``infer(obs)``, or a plain function). ``clock`` defaults to a
    :class:`~policylink.runtime.clock.RealTimeClock` at ``config.fps``; pass a
    :class:`~policylink.runtime.clock.SteppedClock` in simulation.

    >>> executor = Executor(client, FakeEnv("bimanual"), ExecutorConfig(mode="async"))  # doctest: +SKIP
    >>> executor.run(episodes=1)                                                        # doctest: +SKIP
    """

    def __init__(
        self,
        policy: Any,
        env: Env,
        config: ExecutorConfig | None = None,
        *,
        clock: Clock | None = None,
        filters: FilterChain | Iterable[Any] = (),
        validator: ChunkValidator | None = None,
        ready_pose: ReadyPose | None = None,
        listeners: Iterable[LoopListener] = (),
        latency: LatencyEstimator | None = None,
    ) -> None:
        self.config = config or ExecutorConfig()
        self.env = env
        self._infer: InferFn = getattr(policy, "infer", policy)
        self._policy_reset: Callable[[], Any] | None = getattr(policy, "reset", None)
        self.clock: Clock = clock or RealTimeClock(self.config.fps)
        self.filters = filters if isinstance(filters, FilterChain) else FilterChain(filters)
        self.validator = validator or ChunkValidator()
        self.ready_pose = ready_pose
        self.listeners: list[LoopListener] = list(listeners)
        self.latency = latency or LatencyEstimator()
        self.stats = LoopStats(fps=self.clock.fps)
        self.episode_results: list[dict[str, Any]] = []
        self._merge: MergeRule = self.config.merge if not isinstance(self.config.merge, str) else LatestOnly()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policylink-request")
        # Operator controls, set from any thread.
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._quit = threading.Event()
        self._reset_requested = threading.Event()
        self._thread: threading.Thread | None = None
        # Loop state, owned by the control thread.
        self.episode = 0
        self.step = 0
        self._state = "idle"
        self._chunk_counter = 0
        self._generation = 0
        self._pending: _Request | None = None
        self._queue = np.zeros((0, 0), np.float32)
        self._counts = np.zeros(0, np.int64)
        self._queue_chunk = 0
        self._chunk_length = 1
        self._obs: Observation = {}
        self._last_command: np.ndarray | None = None
        self._last_raw: np.ndarray | None = None
        self._last_chunk_id: int | None = None
        self._last_fresh_time = 0.0
        self._tripped = False
        self._last_roundtrip_ms = 0.0
        self._last_server_timing: dict[str, float] = {}

    # -- listeners ---------------------------------------------------------

    def add_listener(self, listener: LoopListener) -> None:
        self.listeners.append(listener)

    def _emit(self, method: str, event: Any) -> None:
        for listener in self.listeners:
            handler = getattr(listener, method, None)
            if handler is None:
                continue
            try:
                handler(event)
            except Exception:  # a broken monitor must not stop the robot
                logger.exception("listener %r failed in %s", listener, method)

    # -- LoopControl ---------------------------------------------------------

    def start(self, episodes: int | None = None) -> None:
        """Resume a paused loop, or run ``episodes`` (default: until :meth:`close`) on a background thread."""
        with self._lock:
            self._running.set()
            if self._thread is None or not self._thread.is_alive():
                if self._state in ("idle", "finished"):
                    self._quit.clear()
                    self._thread = threading.Thread(target=self.run, args=(episodes,), name="policylink-control", daemon=True)
                    self._thread.start()

    def stop(self) -> None:
        """Pause: the robot holds still (no commands) until :meth:`start`."""
        self._running.clear()

    def reset_episode(self) -> None:
        """End the current episode (truncated) and start the next one."""
        self._reset_requested.set()

    def close(self, timeout: float = 10.0) -> None:
        """End the loop after the current tick and release the request thread."""
        self._quit.set()
        self._running.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float | None = None) -> None:
        """Wait for a loop started with :meth:`start` to finish its episodes."""
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "state": self._state,
            "running": self._running.is_set() and self._state not in ("idle", "finished"),
            "mode": self.config.mode,
            "merge": getattr(self._merge, "name", type(self._merge).__name__),
            "episode": self.episode,
            "step": self.step,
            "queue": len(self._queue),
            "fps": round(stats.achieved_fps, 2),
            "stalls": stats.stalls,
            "stall_fraction": round(stats.stall_fraction, 4),
            "chunks": stats.chunks,
            "rejected_chunks": stats.rejected_chunks,
            "watchdog_trips": stats.watchdog_trips,
            "roundtrip_ms": round(self._last_roundtrip_ms, 2),
        }

    def status_line(self) -> str:
        """One line for a live terminal status."""
        s = self.status()
        return (
            f"{s['state']:<8} ep {s['episode']} step {s['step']:>5}  {s['fps']:5.1f} Hz  queue {s['queue']:>3}  "
            f"stalls {s['stalls']} ({100 * s['stall_fraction']:.1f}%)  chunks {s['chunks']} (rejected {s['rejected_chunks']})  "
            f"rtt {s['roundtrip_ms']:.0f} ms  watchdog {s['watchdog_trips']}"
        )

    # -- the loop ------------------------------------------------------------

    def run(self, episodes: int | None = 1, seed: int | None = None) -> dict[str, Any]:
        """Run ``episodes`` episodes (``None``: until :meth:`close`); return the statistics summary."""
        try:
            number = 0
            while not self._quit.is_set() and (episodes is None or number < episodes):
                self._run_episode(None if seed is None else seed + number)
                number += 1
            self._drain()  # not after an error or Ctrl+C: nobody should wait for the server then
        finally:
            self._state = "finished"
        return self.stats.summary()

    def _drain(self, timeout: float = 10.0) -> None:
        """Let a request still in flight finish, so the client is idle when the caller closes it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            concurrent.futures.wait([pending.future], timeout)

    def _run_episode(self, seed: int | None) -> None:
        self._state = "starting"
        self._generation += 1
        self._pending = None
        self._clear_queue()
        self.step = 0
        total_reward, success, ended = 0.0, False, False
        info: dict[str, Any] = {}
        self._obs = self.env.reset(seed)
        if self._policy_reset is not None:
            self._call_policy_reset()
        self._emit("on_episode", EpisodeEvent(self.episode, started=True))
        self.filters.reset(self._current_state())
        self._last_command = self._last_raw = None
        self._last_chunk_id = None
        self._tripped = False
        if self.ready_pose is not None:
            self._move_to_ready_pose()
        if self._wait_first_chunk():
            self._state = "running"
            while not ended and not self._quit.is_set():
                if self._reset_requested.is_set():
                    break
                if not self._running.is_set():
                    self._pause()
                    continue
                result = self._tick()
                total_reward += result.reward
                success = success or result.success
                ended = result.done or (self.config.max_steps is not None and self.step >= self.config.max_steps)
                if result.done:
                    info.update(result.info)
        if self._reset_requested.is_set():  # also while waiting for the first chunk or paused
            self._reset_requested.clear()
            info["reason"] = "operator reset"
        self.stats.end_episode()
        self.stats.episodes += 1
        event = EpisodeEvent(self.episode, started=False, steps=self.step, success=success, total_reward=total_reward, info=info)
        self.episode_results.append(dataclasses.asdict(event))
        self._emit("on_episode", event)
        self.episode += 1

    def _tick(self) -> StepResult:
        self.clock.wait_tick()
        now = self.clock.now()
        self._collect()
        if self._should_request():
            self._request()
            self._collect()
        action, chunk_id = self._pop()
        stalled = action is None
        if stalled:
            self._note_stall(now)
            command = self._last_command
        else:
            self._last_fresh_time = now
            self._tripped = False
            self._record_boundary(action, chunk_id)
            command = self.filters(action)
            self._last_command = command
        self.stats.tick(now, stalled)
        result = self.env.step(command) if command is not None else StepResult(self._obs)
        self.step += 1
        self._obs = result.observation
        latencies = {"roundtrip_ms": self._last_roundtrip_ms, **self._last_server_timing}
        self._emit("on_step", StepEvent(
            self.episode, self.step, time.time(), result.observation, command, chunk_id, not stalled,
            result.reward, result.success, result.done, latencies,
        ))
        return result

    # -- requests ----------------------------------------------------------------

    def _request(self) -> None:
        self._chunk_counter += 1
        obs = dict(self._obs)
        if self.config.send_step:
            obs["step"] = np.int64(self.step)
        if self.config.task is not None and "task" not in obs:
            obs["task"] = self.config.task
        future = self._pool.submit(self._infer, obs)
        self._pending = _Request(future, self._chunk_counter, self.step, self.clock.ticks, self.clock.now(), self._generation)

    def _should_request(self) -> bool:
        if self._pending is not None:
            return False
        queued = len(self._queue)
        if self.config.mode == "sync":
            return queued == 0
        return queued <= self._async_trigger()

    def _async_trigger(self) -> int:
        """Queue length at which the next chunk is requested."""
        trigger = math.ceil(self.config.threshold * (self.config.n_action_steps or self._chunk_length))
        estimate = self.latency.estimate()
        if self.config.adaptive_threshold and estimate is not None:
            # Ask early enough that the reply lands before the queue runs dry.
            trigger = max(trigger, math.ceil(estimate * self.clock.fps) + 1)
        return trigger

    def _collect(self) -> None:
        """Use the pending reply if it has arrived (by the clock's rule)."""
        pending = self._pending
        if pending is None or not self.clock.arrived(pending.future, pending.sent_tick):
            return
        self._pending = None
        if pending.generation != self._generation:
            return  # a reply for an earlier episode or before a pause
        try:
            chunk = pending.future.result()
        except Exception as exc:
            self.stats.errors += 1
            logger.warning("request for chunk %d failed: %s", pending.chunk_id, exc)
            return
        self._accept(pending, chunk)

    def _accept(self, pending: _Request, chunk: Any) -> None:
        actions = np.asarray(chunk, dtype=np.float32)
        reply = getattr(chunk, "reply", {}) or {}
        roundtrip_ms = float((reply.get("client_timing") or {}).get("roundtrip_ms", 0.0))
        server_timing = {k: float(v) for k, v in (getattr(chunk, "server_timing", None) or {}).items() if isinstance(v, (int, float))}
        age = self.clock.now() - pending.sent_time
        self.latency.add(age)
        self._last_roundtrip_ms = roundtrip_ms or age * 1e3
        self._last_server_timing = server_timing
        self.stats.roundtrips_ms.append(self._last_roundtrip_ms)
        reason = ""
        try:
            self.validator.check(actions, self._current_state())
            if age > self.config.watchdog_s:
                self.stats.stale_chunks += 1
                raise ChunkRejected(f"stale: its observation is {age:.2f} s old, the watchdog deadline is {self.config.watchdog_s:.2f} s")
        except ChunkRejected as exc:
            reason = str(exc)
            self.stats.rejected_chunks += 1
            logger.warning("chunk %d rejected: %s", pending.chunk_id, reason)
        self._emit("on_chunk", ChunkEvent(
            self.episode, pending.chunk_id, pending.obs_step, actions, not reason, reason, self._last_roundtrip_ms, server_timing,
        ))
        if not reason:
            self.stats.chunks += 1
            self._enqueue(actions, pending)

    def _enqueue(self, actions: np.ndarray, pending: _Request) -> None:
        self._chunk_length = len(actions)
        if self.config.compensate:
            # The actions for steps that passed while the request ran; n_action_steps
            # then counts from the present, so a slow server cannot starve the loop.
            elapsed = self.step - pending.obs_step
            self.stats.dropped_actions += min(elapsed, len(actions))
            actions = actions[elapsed:]
        if self.config.n_action_steps is not None:
            actions = actions[: self.config.n_action_steps]
        if len(actions) == 0:
            logger.warning("chunk %d arrived %d steps late and all its %d actions are past", pending.chunk_id, self.step - pending.obs_step, self._chunk_length)
            return
        if self._queue.size == 0:
            merged, counts = actions.copy(), np.ones(len(actions), np.int64)
        else:
            overlap = min(len(self._queue), len(actions))
            merged = np.asarray(self._merge.merge(self._queue[:overlap], actions, self._counts[:overlap]), np.float32)
            counts = np.ones(len(merged), np.int64)
            counts[:overlap] += self._counts[:overlap]
            if len(self._queue) > len(actions):  # the old chunk reaches further: keep its tail
                merged = np.concatenate([merged, self._queue[len(actions):]])
                counts = np.concatenate([counts, self._counts[len(actions):]])
        self._queue, self._counts, self._queue_chunk = merged, counts, pending.chunk_id

    def _pop(self) -> tuple[np.ndarray | None, int | None]:
        if len(self._queue) == 0:
            return None, None
        action = self._queue[0]
        self._queue, self._counts = self._queue[1:], self._counts[1:]
        return action, self._queue_chunk

    def _clear_queue(self) -> None:
        self._queue = np.zeros((0, 0), np.float32)
        self._counts = np.zeros(0, np.int64)

    def _wait_first_chunk(self) -> bool:
        """Block (no ticks) until the episode's first chunk is queued; False if told to quit or reset."""
        self._state = "waiting"
        while len(self._queue) == 0:
            if self._quit.is_set() or self._reset_requested.is_set():
                return False
            if self._pending is None:
                self._request()
            pending = self._pending
            assert pending is not None
            # Poll (not result(timeout)): InferenceTimeout is a TimeoutError too.
            concurrent.futures.wait([pending.future], timeout=0.1)
            if not pending.future.done():
                continue
            if pending.future.exception() is not None:
                time.sleep(0.05)  # do not spin against a failing server; _collect counts and logs it
            # The first chunk's delay is not simulated: the robot waits for it.
            pending.sent_tick = self.clock.ticks - getattr(self.clock, "latency_steps", 0)
            pending.sent_time = self.clock.now()
            self._collect()
        self.clock.restart()
        self._last_fresh_time = self.clock.now()
        return True

    def _pause(self) -> None:
        self._state = "paused"
        while not self._running.wait(0.05):
            if self._quit.is_set() or self._reset_requested.is_set():
                return
        # What was queued or requested before the pause belongs to the past.
        self._generation += 1
        self._pending = None
        self._clear_queue()
        self._wait_first_chunk()
        self._state = "running"

    def _move_to_ready_pose(self) -> None:
        assert self.ready_pose is not None
        self._state = "ready"
        self.clock.restart()
        for command in self.ready_pose.ramp(self._current_state()):
            if self._quit.is_set():
                return
            self.clock.wait_tick()
            self._obs = self.env.step(command).observation
            self._last_command = command
        self.filters.reset(self._current_state() if self._current_state() is not None else self._last_command)

    # -- safety and statistics ---------------------------------------------------

    def _note_stall(self, now: float) -> None:
        if not self._tripped and now - self._last_fresh_time > self.config.watchdog_s:
            self._tripped = True
            self.stats.watchdog_trips += 1
            logger.warning("watchdog: no fresh action for %.2f s; holding the last command", now - self._last_fresh_time)
        self._state = "holding" if self._tripped else "running"

    def _record_boundary(self, action: np.ndarray, chunk_id: int | None) -> None:
        if self._last_raw is not None and chunk_id != self._last_chunk_id:
            self.stats.boundary_jumps.append(float(np.max(np.abs(action - self._last_raw))))
        self._last_raw, self._last_chunk_id = action, chunk_id
        self._state = "running"

    def _current_state(self) -> np.ndarray | None:
        state = self.env.state()
        if state is None:
            state = self._obs.get("observation.state")
        return None if state is None else np.asarray(state, dtype=np.float32)

    def _call_policy_reset(self) -> None:
        assert self._policy_reset is not None
        try:
            # Through the request thread: one client must not send two requests at once.
            self._pool.submit(self._policy_reset).result()
        except Exception as exc:  # the server may be down; the loop will hold until it is back
            self.stats.errors += 1
            logger.warning("could not reset the policy's episode state: %s", exc)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
