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
:class:`~policylink.runtime.merging.MergeRule` (:attr:`ExecutorConfig.merge`):
``latest`` (the new chunk replaces the queue), ``average``, ``ensemble``, or:

``rtc``, real-time chunking (Black et al., 2025; async mode only, with
latency compensation)
    Every request sent while actions are still queued carries, under the
    observation key ``"__rtc__"`` (:class:`~policylink.rtc.RTCRequest`):

    - ``prefix``: the queued actions not executed yet, as the server sent
      them (policy space, before any filter; at most ``n_action_steps``):
      ``prefix[i]`` is the action planned for the request's step ``+ i``;
    - ``delay``: the steps expected to pass before the reply is used,
      clamped to ``[0, len(prefix)]``. In simulated time
      (:class:`~policylink.runtime.clock.SteppedClock`) it is exactly the
      clock's ``latency_steps``. In real time ``d = ceil(latency * fps - 0.1)``
      with ``latency`` the recent latency estimate
      (:class:`~policylink.runtime.stats.LatencyEstimator`: by default the 90th
      percentile of the last 20 round trips, measured from tick to tick, so
      whole ticks but for jitter, which the 0.1 absorbs); until a chunk the
      loop did not wait for has arrived, the client-measured round trip of
      the first chunk stands in (0 if unknown);
    - ``execution_horizon``: ``rtc_horizon`` (default: the whole prefix),
      clamped to ``[d, len(prefix)]``; and ``guidance`` when ``rtc_guidance``
      is set (else the server's default; above the server's announced
      ``max_guidance`` it is lowered to it, with one warning).

    The first request of an episode (and the first after a pause or a
    failed request that let the queue run dry) has nothing queued and
    carries no such fields. The server steers the new chunk so that it
    continues the prefix. When it arrives ``e`` steps after its observation
    (``e`` = the steps executed meanwhile, all from the queue), the queue
    becomes ``new[e:]`` (then at most ``n_action_steps`` actions): the
    already queued actions were executed for the ``e`` elapsed steps and the
    new chunk continues from index ``e``; an exact splice, no blend. The
    boundary jump (``stats.boundary_jumps``) is between the last executed old
    action and ``new[e]``. Sync mode is refused: there the queue is empty
    whenever a chunk is requested, so there is nothing to send.

    Whether the server can do it is read from the policy's metadata
    (``metadata.rtc``) when the first request goes out. Without it (a server
    whose policy announces no RTC support, or a policy with no metadata) the
    executor logs once "the server's policy cannot do real-time chunking;
    merging latest-only", sends no RTC fields and merges latest-only;
    :meth:`Executor.status` then says ``merge: "latest (rtc unsupported)"``.

Safety, with the default settings:

- every chunk is validated before it is queued: its width (the policy's
  action size), finite values, the policy's announced action range (the
  checkpoint's statistics, widened by ``bounds_margin``), and the optional
  checks of the :class:`~policylink.runtime.filters.ChunkValidator`; a rejected
  chunk is reported and never executed, a chunk whose observation is older
  than the watchdog deadline is stale and rejected;
- every action passes the safety filters, then must have the robot's width,
  is bounded to the environment's joint ranges, and after anything that broke
  the stream of fresh actions (episode start, stall, watchdog trip, pause)
  rejoins the trajectory no faster than :class:`~policylink.runtime.safety.ResumeRamp`
  allows: never a jump;
- failed requests back off; an episode whose first chunk keeps failing or
  being rejected ends with an error after ``first_chunk_attempts``;
- when no fresh action came for ``watchdog_s`` the watchdog trips and does
  ``watchdog_action``: hold the last command, move to the ready pose, or stop
  the robot (its safe stop, e.g. torque off) and end the episode.

With no action range from the policy and none from the environment the
executor refuses to start, unless told ``allow_unbounded=True``.

The executor is a :class:`~policylink.runtime.events.LoopControl` (start /
stop / reset from any thread) and calls its listeners from the control thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..action_space import ActionSpace, anchor_state
from ..envs.base import Env, StepResult
from ..rtc.request import RTC_KEY, RTCRequest, RTCSupport
from ..types import Observation
from .clock import Clock, RealTimeClock
from .events import ChunkEvent, EpisodeEvent, LoopListener, StepEvent
from .filters import ActionMapping, ChunkRejected, ChunkValidator, FilterChain, ReadyPose
from .merging import LatestOnly, MergeRule, RTCSplice, make_merge_rule
from .safety import DEFAULT_BOUNDS_MARGIN, ActionBounds, Backoff, ResumeRamp, step_towards
from .stats import LatencyEstimator, LoopStats

__all__ = ["Executor", "ExecutorConfig", "MODES", "WATCHDOG_ACTIONS"]

logger = logging.getLogger("policylink.runtime")

MODES = ("sync", "async")
#: What the watchdog may do when it trips.
WATCHDOG_ACTIONS = ("hold", "ready", "stop")

#: Turns an observation into a ``(horizon, action_dim)`` chunk (``PolicyClient.infer``).
InferFn = Callable[[Observation], Any]

#: Real-time chunking: ``d = ceil(latency * fps - RTC_DELAY_SLACK)``. Round trips are measured from
#: tick to tick, so they are whole ticks apart but for clock jitter, which this much of a tick absorbs.
RTC_DELAY_SLACK = 0.1
#: What the executor logs (once) when the server's policy cannot do real-time chunking.
RTC_UNSUPPORTED = "the server's policy cannot do real-time chunking; merging latest-only"
_UNKNOWN: Any = object()


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
    #: How a fresh chunk combines with the queued actions: ``latest``, ``average``, ``ensemble``, ``rtc``
    #: (real-time chunking, see the module's docstring) or a :class:`~policylink.runtime.merging.MergeRule`.
    merge: MergeRule | str = "latest"
    #: Seconds without a fresh action before the watchdog trips; older chunks are stale.
    watchdog_s: float = 1.0
    #: Steps per episode (``None``: until the environment ends the episode).
    max_steps: int | None = None
    #: Put the control step into each request (key ``step``).
    send_step: bool = True
    #: Language instruction added to observations without one.
    task: str | None = None
    #: What the watchdog does when it trips: ``hold`` the last command, move to the ``ready`` pose,
    #: or ``stop`` the robot (the environment's safe stop, e.g. torque off) and end the episode.
    watchdog_action: str = "hold"
    #: Failed or rejected first chunks of an episode before it ends with an error.
    first_chunk_attempts: int = 10
    #: Chunks may leave the policy's announced action range by this fraction of it (each side).
    bounds_margin: float = DEFAULT_BOUNDS_MARGIN
    #: After an interruption the command rejoins the trajectory at most this much per joint per tick;
    #: ``None``: ``resume_factor`` times the largest per-tick change seen in normal running.
    resume_max_delta: float | None = None
    resume_factor: float = 2.0
    #: Merge ``rtc``: steps of the queued remainder that guide the new chunk (``execution_horizon``;
    #: ``None``: the whole remainder), at least the delay, at most the remainder.
    rtc_horizon: int | None = None
    #: Merge ``rtc``: guidance weight asked of the server (``None``: the server's default).
    rtc_guidance: float | None = None

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
        if self.watchdog_action not in WATCHDOG_ACTIONS:
            raise ValueError(f"watchdog_action must be one of {WATCHDOG_ACTIONS}, got {self.watchdog_action!r}")
        if self.first_chunk_attempts < 1:
            raise ValueError(f"first_chunk_attempts must be at least 1, got {self.first_chunk_attempts}")
        if self.bounds_margin < 0:
            raise ValueError(f"bounds_margin must not be negative, got {self.bounds_margin}")
        if isinstance(self.merge, str):
            self.merge = make_merge_rule(self.merge)
        if isinstance(self.merge, RTCSplice):
            if not self.compensate:
                raise ValueError(
                    "merge 'rtc' needs latency compensation (compensate=True; CLI: no --no-compensation): the new chunk "
                    "is spliced in at the index of the steps executed while it was computed, which compensation drops"
                )
            if self.mode != "async":
                raise ValueError(
                    f"merge 'rtc' needs mode 'async', got {self.mode!r}: in sync mode nothing is queued when a chunk is "
                    "requested, so there is no remainder for the server to continue"
                )
        elif self.rtc_horizon is not None or self.rtc_guidance is not None:
            raise ValueError(f"rtc_horizon and rtc_guidance apply to merge 'rtc' only, not {getattr(self.merge, 'name', self.merge)!r}")
        if self.rtc_horizon is not None and self.rtc_horizon < 1:
            raise ValueError(f"rtc_horizon must be at least 1, got {self.rtc_horizon}")
        if self.rtc_guidance is not None and not (math.isfinite(self.rtc_guidance) and self.rtc_guidance > 0):
            raise ValueError(f"rtc_guidance must be a number > 0, got {self.rtc_guidance}")


@dataclasses.dataclass
class _Request:
    future: concurrent.futures.Future
    chunk_id: int
    obs_step: int
    sent_tick: int
    sent_time: float
    generation: int
    #: An episode's first chunk, which the loop waits for (its age says nothing about the latency).
    awaited: bool = False
    #: The observed state a relative or delta chunk is anchored on (``None`` for absolute actions).
    anchor: np.ndarray | None = None


class Executor:
    """Runs ``env`` with actions from ``policy`` at a fixed rate.

    ``policy`` is a :class:`~policylink.client.PolicyClient` (or anything with
    ``infer(obs)``, or a plain function). ``clock`` defaults to a
    :class:`~policylink.runtime.clock.RealTimeClock` at ``config.fps``; pass a
    :class:`~policylink.runtime.clock.SteppedClock` in simulation.

    Chunks outside ``bounds`` (default: the range the policy announces in
    its metadata, widened by ``config.bounds_margin``; ignored with
    ``use_policy_bounds=False``) are refused; every command is clipped to
    ``robot_bounds`` (default: the environment's joint ranges). Without
    either, construction fails unless ``allow_unbounded=True``.

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
        bounds: ActionBounds | tuple[Any, Any] | None = None,
        robot_bounds: ActionBounds | tuple[Any, Any] | None = None,
        use_policy_bounds: bool = True,
        allow_unbounded: bool = False,
        control: ActionSpace | None = None,
    ) -> None:
        self.config = config or ExecutorConfig()
        self.env = env
        self._policy = policy
        self._infer: InferFn = getattr(policy, "infer", policy)
        self._policy_reset: Callable[[], Any] | None = getattr(policy, "reset", None)
        self.clock: Clock = clock or RealTimeClock(self.config.fps)
        self.filters = filters if isinstance(filters, FilterChain) else FilterChain(filters)
        self.ready_pose = ready_pose
        self._mapping = next((f for f in self.filters.filters if isinstance(f, ActionMapping)), None)
        #: Width of the policy's actions: the mapping's input, else the environment's action size.
        self.policy_dim = len(self._mapping.indices) if self._mapping is not None else env.action_dim
        self.validator = validator or ChunkValidator()
        if self.validator.action_dim is None:
            self.validator.action_dim = self.policy_dim
        if self._mapping is not None:
            self.validator.indices = self._mapping.indices
        #: Chunks outside this range (the policy's, widened) are refused; commands are clipped to ``robot_bounds``.
        self.bounds = _bounds(bounds, "bounds", self.policy_dim)
        metadata = _metadata(policy)
        #: A client of a plain (openpi) server: observations keep openpi's names (``prompt``), nothing policylink-only is added.
        self._plain = _speaks_plain(policy)
        #: What the policy's actions mean; relative and delta chunks become absolute commands when they arrive.
        self.control = _control(metadata, control, self.policy_dim)
        if not self.control.absolute and isinstance(self.config.merge, RTCSplice):
            raise ValueError(
                f"merge 'rtc' needs absolute actions: the policy's are {self.control.name}, and the queued commands it sends back "
                "to guide the next chunk would not be in the policy's own terms"
            )
        #: Whether ``bounds`` is the policy's announced range, in its own (possibly relative) units.
        self._bounds_in_policy_units = False
        if self.bounds is None and use_policy_bounds:
            self.bounds = ActionBounds.from_metadata(metadata, self.config.bounds_margin)
            self._bounds_in_policy_units = self.bounds is not None and not self.control.absolute
        self.robot_bounds = _bounds(robot_bounds if robot_bounds is not None else env.action_bounds(), "robot bounds", env.action_dim)
        if self.bounds is not None and self.bounds.dim != self.policy_dim:
            raise ValueError(f"the policy announces bounds for {self.bounds.dim} values per action, but its actions have {self.policy_dim}")
        if self.bounds is None and self.robot_bounds is None and not allow_unbounded:
            raise ValueError(
                "no action bounds known: the policy announces no action range and the environment no joint ranges; "
                "give bounds=(low, high) (CLI: --filter.limits LOW,HIGH), or allow_unbounded=True (CLI: --allow-unbounded)"
            )
        self._check_watchdog_action(env)
        self._ramp = ResumeRamp(self.config.resume_factor, window=max(2, round(2 * self.clock.fps)),
                                max_delta=self.config.resume_max_delta, floor=self._ramp_floor())
        self._backoff = Backoff()
        self._retry_at = 0.0
        self.listeners: list[LoopListener] = list(listeners)
        self.latency = latency or LatencyEstimator()
        self.stats = LoopStats(fps=self.clock.fps)
        #: The last episodes' results (bounded: a robot may run episodes all day).
        self.episode_results: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._merge: MergeRule = self.config.merge if not isinstance(self.config.merge, str) else LatestOnly()
        #: Real-time chunking: the server's support (``_UNKNOWN`` until the first request reads it; ``None``: it cannot).
        self._rtc_support: Any = _UNKNOWN if isinstance(self._merge, RTCSplice) else None
        self._rtc_guidance = self.config.rtc_guidance
        self._rtc_metadata_failed = False
        #: Whether a chunk the loop did not wait for has arrived (the latency estimate then measures the loop's delay).
        self._latency_measured = False
        #: The round trip of the first chunk (measured by the client), the delay's estimate until then.
        self._first_roundtrip_s: float | None = None
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
        self._episode_error: str | None = None
        self._stop_episode = False

    def _check_watchdog_action(self, env: Env) -> None:
        action = self.config.watchdog_action
        if action == "ready" and self.ready_pose is None:
            raise ValueError("watchdog_action 'ready' needs a ready pose (ready_pose=ReadyPose(...); CLI: --ready-pose)")
        if action == "stop" and type(env).safe_stop is Env.safe_stop:
            raise ValueError(f"watchdog_action 'stop' needs an environment with a safe stop; {env.name} has none")

    def _ramp_floor(self) -> Any:
        """The slowest the resume ramp moves: 0.5 % of each joint's range per tick (when the range is known)."""
        if self.robot_bounds is not None:
            return np.maximum(0.005 * self.robot_bounds.width, 1e-4)
        return 1e-4

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
            "merge": self._merge_mode(),
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

    def _merge_mode(self) -> str:
        """The merge rule in effect: ``rtc`` falls back to latest-only against a server that cannot do it."""
        name = getattr(self._merge, "name", type(self._merge).__name__)
        if isinstance(self._merge, RTCSplice) and self._rtc_support is None:
            return "latest (rtc unsupported)"
        return name

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
        self._episode_error = None
        self._stop_episode = False
        self._ramp.interrupt()  # the first command rejoins the robot's state, never jumps
        self._backoff.succeeded()
        self._retry_at = 0.0
        if self.ready_pose is not None:
            self._move_to_ready_pose()
        if self._wait_first_chunk():
            self._state = "running"
            while not ended and not self._quit.is_set():
                if self._reset_requested.is_set() or self._stop_episode:
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
        if self._stop_episode:
            info["reason"] = "watchdog stop"
        if self._episode_error is not None:
            info["error"] = self._episode_error
            logger.error("episode %d ended: %s", self.episode, self._episode_error)
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
        command = None if action is None else self._command_for(action)
        stalled = command is None
        if stalled:
            command = self._stalled_command(now)
            chunk_id = None
        else:
            self._last_fresh_time = now
            self._tripped = False
            assert action is not None
            self._record_boundary(action, chunk_id)
        self._last_command = command
        self.stats.tick(now, stalled)
        # Step t pairs the observation at t (what the action was chosen against) with action t, as LeRobot's datasets do.
        step, observation = self.step, self._obs
        result = self.env.step(command) if command is not None else StepResult(self._obs)
        self.step += 1
        self._obs = result.observation
        latencies = {"roundtrip_ms": self._last_roundtrip_ms, **self._last_server_timing}
        self._emit("on_step", StepEvent(
            self.episode, step, time.time(), observation, command, chunk_id, not stalled,
            result.reward, result.success, result.done, latencies,
        ))
        return result

    # -- requests ----------------------------------------------------------------

    def _request(self) -> None:
        self._chunk_counter += 1
        obs = dict(self._obs)
        if self.config.send_step:
            obs["step"] = np.int64(self.step)
        if self.config.task is not None and "task" not in obs and "prompt" not in obs:
            obs["prompt" if self._plain else "task"] = self.config.task  # openpi's name for it
        anchor = None if self.control.absolute else self._anchor(obs)
        if self._rtc_support is None:
            future = self._pool.submit(self._infer, obs)
        else:  # real-time chunking, or not yet known whether the server can
            future = self._pool.submit(self._infer_rtc, obs, self._rtc_request())
        self._pending = _Request(future, self._chunk_counter, self.step, self.clock.ticks, self.clock.now(), self._generation, anchor=anchor)

    def _anchor(self, obs: Observation) -> np.ndarray | None:
        """The observed state, in the policy's action space, that a relative or delta chunk for ``obs`` starts from."""
        state = anchor_state(obs)
        if state is None:
            state = self.env.state()
        if state is None:
            return None
        state = np.asarray(state, np.float32).reshape(-1)
        if self._mapping is not None and state.size == self.env.action_dim and state.size != self.policy_dim:
            state = state[self._mapping.indices]  # the robot joints the policy drives
        return state

    def _rtc_request(self) -> RTCRequest | None:
        """The real-time-chunking fields for a request sent now: the queued remainder, the expected delay, the horizon.

        ``None`` when nothing is queued (an episode's first request). The
        queue's first action is the one for the present step, the step of
        the observation sent, so ``prefix[i]`` belongs to the chunk's step ``i``.
        """
        queued = len(self._queue)
        if queued == 0:
            return None
        delay = min(self._rtc_delay(), queued)
        horizon = queued if self.config.rtc_horizon is None else min(max(self.config.rtc_horizon, delay), queued)
        return RTCRequest(np.array(self._queue, np.float32), delay, max(horizon, 1))

    def _rtc_delay(self) -> int:
        """Control steps expected between sending a request now and using its reply (before clamping to the queue)."""
        simulated = getattr(self.clock, "latency_steps", None)
        if simulated is not None:  # simulated time: a reply is used exactly latency_steps ticks after its request
            return int(simulated)
        estimate = self.latency.estimate()
        if not self._latency_measured and self._first_roundtrip_s is not None:
            # Only the awaited first chunk so far (its age counts as 0): its round trip is the best guess.
            estimate = max(estimate or 0.0, self._first_roundtrip_s)
        return 0 if estimate is None else max(0, math.ceil(estimate * self.clock.fps - RTC_DELAY_SLACK))

    def _infer_rtc(self, obs: Observation, request: RTCRequest | None) -> Any:
        """On the request thread: learn whether the server can do real-time chunking (once), then send."""
        if self._rtc_support is _UNKNOWN:
            self._resolve_rtc()
        support = self._rtc_support
        if request is not None and support is not None and support is not _UNKNOWN:
            obs[RTC_KEY] = dataclasses.replace(request, guidance=self._rtc_guidance).to_wire()
        return self._infer(obs)

    def _resolve_rtc(self) -> None:
        """Read the policy's metadata: does it steer chunks with real-time-chunking fields? Warns once if not."""
        try:
            metadata = getattr(self._policy, "metadata", None)
        except Exception as exc:  # the server is unreachable: ask again with the next request
            if not self._rtc_metadata_failed:
                self._rtc_metadata_failed = True
                logger.warning("could not read the policy's metadata to learn whether it can do real-time chunking: %s", exc)
            return
        support = getattr(metadata, "rtc", None)
        if not isinstance(support, RTCSupport):
            logger.warning(RTC_UNSUPPORTED)
            self._rtc_support = None
            return
        if self._rtc_guidance is not None and self._rtc_guidance > support.max_guidance:
            logger.warning("rtc_guidance %g is above the server's limit %g; asking for %g", self._rtc_guidance, support.max_guidance, support.max_guidance)
            self._rtc_guidance = support.max_guidance
        self._rtc_support = support

    def _should_request(self) -> bool:
        if self._pending is not None or self.clock.now() < self._retry_at:
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

    def _collect(self) -> str | None:
        """Use the pending reply if it has arrived (by the clock's rule); why it was unusable, if it was."""
        pending = self._pending
        if pending is None or not self.clock.arrived(pending.future, pending.sent_tick):
            return None
        self._pending = None
        if pending.generation != self._generation:
            return None  # a reply for an earlier episode or before a pause
        try:
            chunk = pending.future.result()
        except Exception as exc:
            self.stats.errors += 1
            reason = f"request for chunk {pending.chunk_id} failed: {type(exc).__name__}: {exc}"
            self._retry_at = self.clock.now() + self._backoff.failed()
            if _worth_logging(self._backoff.failures):  # a failing server is reported, not logged 30 times a second
                logger.warning("%s (%d in a row; next try in %.2f s)", reason, self._backoff.failures, self._retry_at - self.clock.now())
            return reason
        self._backoff.succeeded()
        return self._accept(pending, chunk)

    def _accept(self, pending: _Request, chunk: Any) -> str | None:
        actions = np.asarray(chunk, dtype=np.float32)
        reply = getattr(chunk, "reply", {}) or {}
        roundtrip_ms = float((reply.get("client_timing") or {}).get("roundtrip_ms", 0.0))
        server_timing = {k: float(v) for k, v in (getattr(chunk, "server_timing", None) or {}).items() if isinstance(v, (int, float))}
        age = self.clock.now() - pending.sent_time
        self.latency.add(age)
        if not pending.awaited:
            self._latency_measured = True
        elif roundtrip_ms and self._first_roundtrip_s is None:
            self._first_roundtrip_s = roundtrip_ms / 1e3
        self._last_roundtrip_ms = roundtrip_ms or age * 1e3
        self._last_server_timing = server_timing
        self.stats.roundtrips_ms.append(self._last_roundtrip_ms)
        reason = ""
        raw = actions
        try:
            actions = self._to_commands(raw, pending.anchor)
            self.validator.check(actions, self._current_state())
            self._check_bounds(raw if self._bounds_in_policy_units else actions)
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
        if reason:
            return f"chunk {pending.chunk_id} rejected: {reason}"
        self.stats.chunks += 1
        self._enqueue(actions, pending)
        return None

    def _to_commands(self, actions: np.ndarray, anchor: np.ndarray | None) -> np.ndarray:
        """A relative or delta chunk as absolute commands, anchored on its observation's state (absolute: unchanged)."""
        if self.control.absolute:
            return actions
        try:
            return self.control.to_absolute(actions, anchor)
        except ValueError as exc:
            raise ChunkRejected(str(exc)) from None

    def _check_bounds(self, actions: np.ndarray) -> None:
        """Refuse a chunk that leaves the policy's action range (checked after the validator: shape and values are sane)."""
        if self.bounds is None:
            return
        where = self.bounds.outside(actions)
        if where is not None:
            step, joint = where
            raise ChunkRejected(
                f"outside the policy's action range: {actions[step, joint]:.4g} at step {step}, joint {joint} "
                f"(allowed [{self.bounds.low[joint]:.4g}, {self.bounds.high[joint]:.4g}])"
            )

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
        self._ramp.new_chunk(self._in_robot_space(actions))

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
        """Block (no ticks) until the episode's first chunk is queued.

        False if told to quit or reset, or after ``first_chunk_attempts``
        failed or rejected chunks (then :attr:`_episode_error` says why).
        Between attempts it waits longer and longer.
        """
        self._state = "waiting"
        backoff = Backoff()
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
            # The first chunk's delay is not simulated: the robot waits for it.
            pending.sent_tick = self.clock.ticks - getattr(self.clock, "latency_steps", 0)
            pending.sent_time = self.clock.now()
            pending.awaited = True
            problem = self._collect()
            if problem is None:
                continue
            if backoff.failures + 1 >= self.config.first_chunk_attempts:
                self._episode_error = f"no usable first chunk after {self.config.first_chunk_attempts} attempts; the last: {problem}"
                return False
            if self._interruptible_wait(backoff.failed()):
                return False
        self.clock.restart()
        self._last_fresh_time = self.clock.now()
        self._retry_at = 0.0
        return True

    def _interruptible_wait(self, seconds: float) -> bool:
        """Wait (wall time) unless told to quit or reset; True if told."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._quit.wait(min(0.05, max(0.0, deadline - time.monotonic()))) or self._reset_requested.is_set():
                return True
        return self._quit.is_set() or self._reset_requested.is_set()

    def _pause(self) -> None:
        self._state = "paused"
        while not self._running.wait(0.05):
            if self._quit.is_set() or self._reset_requested.is_set():
                return
        # What was queued or requested before the pause belongs to the past.
        self._generation += 1
        self._pending = None
        self._clear_queue()
        self._ramp.interrupt()
        if not self._wait_first_chunk() and self._episode_error is not None:
            self._stop_episode = True
        self._state = "running"

    def _move_to_ready_pose(self) -> None:
        """Ramp to the ready pose through the robot-space filters and bounds; a pause waits, a reset or quit ends it."""
        assert self.ready_pose is not None
        self._state = "ready"
        self.clock.restart()
        robot_filters = self.filters.after(self._mapping) if self._mapping is not None else self.filters
        for target in self.ready_pose.ramp(self._current_state()):
            while not self._running.is_set():  # paused: hold still until started again
                if self._quit.wait(0.05) or self._reset_requested.is_set():
                    return
            if self._quit.is_set() or self._reset_requested.is_set():
                return
            self.clock.wait_tick()
            command = self._within_robot_bounds(robot_filters(target))
            self._obs = self.env.step(command).observation
            self._last_command = command
        self.filters.reset(self._current_state() if self._current_state() is not None else self._last_command)
        self.clock.restart()

    # -- safety and statistics ---------------------------------------------------

    def _command_for(self, action: np.ndarray) -> np.ndarray | None:
        """The command for a fresh action: filters, the robot's width, the resume ramp, the robot's bounds.

        ``None`` when the action cannot become a command (a filter refused
        it, or it has the wrong width): the tick then holds, and it is reported.
        """
        try:
            command = np.asarray(self.filters(action), dtype=np.float32)
        except Exception as exc:  # e.g. a mapping given the wrong width: hold, report, never crash
            self._bad_command(f"the safety filters refused an action: {type(exc).__name__}: {exc}")
            return None
        if command.shape != (self.env.action_dim,):
            self._bad_command(f"a command of shape {command.shape} for a robot that takes ({self.env.action_dim},)")
            return None
        if not np.all(np.isfinite(command)):
            self._bad_command("a non-finite command after the filters")
            return None
        previous = self._last_command if self._last_command is not None else self._current_state()
        return self._within_robot_bounds(self._ramp(command, previous))

    def _bad_command(self, reason: str) -> None:
        self.stats.rejected_commands += 1
        if _worth_logging(self.stats.rejected_commands):
            logger.warning("holding instead of sending %s (%d so far)", reason, self.stats.rejected_commands)

    def _stalled_command(self, now: float) -> np.ndarray | None:
        """What to send on a tick without a fresh action: the watchdog's decision."""
        self._ramp.interrupt()  # whatever comes next rejoins from where the robot is held
        if not self._tripped and now - self._last_fresh_time > self.config.watchdog_s:
            self._tripped = True
            self.stats.watchdog_trips += 1
            self._trip(now - self._last_fresh_time)
        self._state = "holding" if self._tripped else "running"
        if self._tripped and self.config.watchdog_action == "ready" and self.ready_pose is not None:
            return self._towards_ready_pose()
        return self._last_command

    def _trip(self, silent_s: float) -> None:
        action = self.config.watchdog_action
        logger.warning("watchdog: no fresh action for %.2f s; %s", silent_s,
                       {"hold": "holding the last command", "ready": "moving to the ready pose", "stop": "stopping the robot"}[action])
        if action == "stop":
            self.env.safe_stop()
            self._stop_episode = True

    def _towards_ready_pose(self) -> np.ndarray | None:
        """One bounded step from the held command towards the ready pose."""
        assert self.ready_pose is not None
        previous = self._last_command if self._last_command is not None else self._current_state()
        target = self.ready_pose.pose
        if previous is None or previous.shape != target.shape:
            return self._last_command
        return self._within_robot_bounds(step_towards(previous, target, self._ramp.step(target.size)))

    def _within_robot_bounds(self, command: np.ndarray) -> np.ndarray:
        """Every command sent to the robot goes through here: clipped to its joint ranges, when known."""
        return self.robot_bounds.clip(command) if self.robot_bounds is not None else command

    def _in_robot_space(self, actions: np.ndarray) -> np.ndarray:
        """Policy-space actions placed where the mapping puts them (for per-tick change estimates)."""
        if self._mapping is None:
            return actions
        placed = np.zeros((len(actions), self.env.action_dim), np.float32)
        placed[:, self._mapping.indices] = actions
        return placed

    def _record_boundary(self, action: np.ndarray, chunk_id: int | None) -> None:
        if self._last_raw is not None and chunk_id != self._last_chunk_id:
            self.stats.boundary_jumps.append(float(np.max(np.abs(action - self._last_raw))))
        self._last_raw, self._last_chunk_id = action, chunk_id
        self._state = "running"

    def _current_state(self) -> np.ndarray | None:
        """The robot's state in the actions' units, for ramps, jump checks and filters (``None``: not comparable)."""
        if not getattr(self.env, "position_actions", True):
            return None  # displacement or velocity actions: no state is a command to ramp from
        state = self.env.state()
        if state is None:
            state = anchor_state(self._obs)  # the observation's state, under LeRobot's or openpi's key
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


def _metadata(policy: Any) -> Any:
    """The policy's metadata (a :class:`~policylink.client.PolicyClient`'s), if it has any."""
    try:
        return getattr(policy, "metadata", None)
    except Exception as exc:  # a client that cannot reach its server: no announced range
        logger.warning("could not read the policy's metadata for its action range: %s", exc)
        return None


def _speaks_plain(policy: Any) -> bool:
    """Whether ``policy`` is a client of a plain (openpi) server (read once, when the executor is built)."""
    try:
        return not getattr(policy, "speaks_policylink", True)
    except Exception as exc:  # a client that cannot reach its server: assume policylink, as before
        logger.warning("could not read which protocol the server speaks: %s", exc)
        return False


def _control(metadata: Any, given: ActionSpace | None, dim: int) -> ActionSpace:
    """The action space to run with: ``given``, else the policy's declared one, else joint/abs.

    ``given`` may only fill in for a policy that declares none (a plain
    server); contradicting a declared one is refused.
    """
    declared = getattr(metadata, "control", None)
    if given is not None and isinstance(declared, ActionSpace) and declared != ActionSpace() and declared != given:
        raise ValueError(f"the policy declares {declared.name} actions, not {given.name}: drop the action-space override")
    control = given or (declared if isinstance(declared, ActionSpace) else ActionSpace())
    control.check_dims(dim)
    return control


def _bounds(value: Any, what: str, dim: int) -> ActionBounds | None:
    if value is None or isinstance(value, ActionBounds):
        bounds = value
    else:
        low, high = value
        bounds = ActionBounds(np.broadcast_to(np.asarray(low, np.float32), (dim,)), np.broadcast_to(np.asarray(high, np.float32), (dim,)))
    if bounds is not None and bounds.dim != dim:
        raise ValueError(f"{what} have {bounds.dim} values, expected {dim}")
    return bounds


def _worth_logging(count: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th... occurrence of a repeated problem."""
    return count & (count - 1) == 0
