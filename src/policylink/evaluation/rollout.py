"""One evaluation episode, run by the client runtime's executor in simulated (stepped) time.

The episode is driven by :class:`~policylink.runtime.executor.Executor`, the
same control loop a robot runs, with a
:class:`~policylink.runtime.clock.SteppedClock`: the simulator's clock is its
step counter, and a chunk is usable ``sim_latency_steps`` steps after the
observation it was computed from, however long the real request took. A run
is therefore reproducible on any machine, and asynchronous execution is judged
by the delay you ask for, not by how busy the evaluation machine was.

``sync``
    Ask for a chunk when the queue is empty, execute its first
    ``n_action_steps`` actions, ask again. While the request is (simulated
    to be) in flight the robot holds its last action for
    ``sim_latency_steps`` steps, then executes the chunk from its start.
``async``
    Ask for the next chunk when the queue falls to ``async_threshold`` times
    the chunk length (or earlier, by the executor's latency estimate: one
    step more than the simulated delay), keep executing meanwhile. The chunk
    arrives ``sim_latency_steps`` steps after its observation; its actions
    for the steps that passed are dropped (latency compensation), the rest
    replace the queue (latest-only merge). If the queue runs dry first, the
    robot holds its last action.

With ``merge="rtc"`` (async only) the executor does real-time chunking: each
request carries the queued actions and the delay (exactly
``sim_latency_steps``), and the new chunk is spliced in where it arrives (see
:mod:`policylink.runtime.executor`); against a policy that cannot do it the
runner warns once and merges latest-only.

An episode starts when its first chunk is there: the first request's delay is
not simulated (a robot waits for its first chunk before moving). Each episode
gets a fresh executor, so nothing learnt in one episode (the latency
estimate) changes the next: an episode's result depends on its seed alone.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..envs.base import Env, StepResult
from ..runtime.clock import SteppedClock
from ..runtime.events import ChunkEvent, LoopListener
from ..runtime.executor import Executor, ExecutorConfig
from ..types import Observation

__all__ = ["ExecutionConfig", "EpisodeResult", "run_episode", "MODES"]

MODES = ("sync", "async")
#: How a chunk replaces the queue: ``latest``, or ``rtc`` (real-time chunking; async only).
MERGES = ("latest", "rtc")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How chunks are executed during an episode."""

    mode: str = "sync"
    #: Simulated inference delay, in control steps.
    sim_latency_steps: int = 0
    #: Actions executed from each chunk (``None``: the whole chunk).
    n_action_steps: int | None = None
    #: Async: ask for the next chunk when this fraction of ``n_action_steps`` is left.
    async_threshold: float = 0.5
    max_steps: int = 300
    #: ``latest``, or ``rtc``: real-time chunking (async only).
    merge: str = "latest"
    #: ``rtc``: the execution horizon asked for (``None``: the whole queued remainder).
    rtc_horizon: int | None = None
    #: ``rtc``: the guidance weight asked for (``None``: the server's default).
    rtc_guidance: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.sim_latency_steps < 0:
            raise ValueError(f"sim_latency_steps must be >= 0, got {self.sim_latency_steps}")
        if self.n_action_steps is not None and self.n_action_steps <= 0:
            raise ValueError(f"n_action_steps must be positive, got {self.n_action_steps}")
        if not 0.0 <= self.async_threshold < 1.0:
            raise ValueError(f"async_threshold must be in [0, 1), got {self.async_threshold}")
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if self.merge == "rtc" and self.mode != "async":
            raise ValueError("merge 'rtc' needs mode 'async': in sync mode nothing is queued when a chunk is requested")
        if self.merge != "rtc" and (self.rtc_horizon is not None or self.rtc_guidance is not None):
            raise ValueError("rtc_horizon and rtc_guidance apply to merge 'rtc' only")

    def executor_config(self, fps: float) -> ExecutorConfig:
        return ExecutorConfig(
            mode=self.mode,
            fps=fps,
            n_action_steps=self.n_action_steps,
            threshold=self.async_threshold,
            # A held robot has not moved: a sync chunk is executed from its start.
            compensate=self.mode == "async",
            merge=self.merge,
            rtc_horizon=self.rtc_horizon,
            rtc_guidance=self.rtc_guidance,
            # Simulated time has no stale chunks: a reply is exactly as late as asked.
            watchdog_s=float("inf"),
            max_steps=self.max_steps,
        )


@dataclasses.dataclass
class EpisodeResult:
    """What one episode produced (JSON-ready through :meth:`to_dict`)."""

    index: int
    seed: int
    success: bool = False
    total_reward: float = 0.0
    max_reward: float = 0.0
    length: int = 0
    terminated: bool = False
    truncated: bool = False
    #: Number of chunks requested.
    requests: int = 0
    #: Actions dropped because their time had passed (async latency compensation).
    dropped_actions: int = 0
    #: Steps spent holding the last action while waiting for a chunk.
    held_steps: int = 0
    roundtrip_ms: list[float] = dataclasses.field(default_factory=list)
    infer_ms: list[float] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    video: str | None = None
    #: The run was stopped (Ctrl+C, another worker's error) before the episode ended.
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["return"] = data.pop("total_reward")
        data["roundtrip_ms"] = [round(v, 3) for v in self.roundtrip_ms]
        data["infer_ms"] = [round(v, 3) for v in self.infer_ms]
        data["wall_s"] = round(self.wall_s, 4)
        return data


class _Recorder(Env):
    """Passes the executor's calls to the simulator and writes down what came back."""

    def __init__(self, env: Env, result: EpisodeResult, on_frame: Callable[[], None] | None, stop: threading.Event | None) -> None:
        self.env, self.result, self.on_frame, self.stop = env, result, on_frame, stop
        self.name, self.action_dim, self.fps = env.name, env.action_dim, env.fps
        self.position_actions = env.position_actions  # displacement actions: the executor ramps from no state
        self.executor: Executor | None = None

    @property
    def camera_names(self) -> tuple[str, ...]:
        return self.env.camera_names

    def reset(self, seed: int | None = None) -> Observation:
        obs = self.env.reset(seed)
        if self.on_frame is not None:
            self.on_frame()
        return obs

    def step(self, action: np.ndarray) -> StepResult:
        outcome = self.env.step(action)
        result = self.result
        result.length += 1
        result.total_reward += outcome.reward
        result.max_reward = outcome.reward if result.length == 1 else max(result.max_reward, outcome.reward)
        result.success = result.success or outcome.success
        result.terminated, result.truncated = outcome.terminated, outcome.truncated
        if self.on_frame is not None:
            self.on_frame()
        if self.stop is not None and self.stop.is_set() and not outcome.done and self.executor is not None:
            result.interrupted = True
            self.executor.close()
        return outcome

    def state(self) -> np.ndarray | None:
        return self.env.state()

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self.env.action_bounds()


class _Policy:
    """The executor's view of the client: counts requests, stops the run at the first failure.

    The executor keeps a robot running through failed requests (it holds the
    last command); an evaluation must not: a failure ends it with the error.
    """

    def __init__(self, infer: Callable[[Observation], Any], reset: Callable[[], Any] | None, result: EpisodeResult, action_dim: int,
                 metadata: Any = None) -> None:
        self._infer, self._action_dim, self.result = infer, action_dim, result
        #: The served policy's metadata: tells the executor whether the server can do real-time chunking.
        self.metadata = metadata
        self.error: BaseException | None = None
        self.executor: Executor | None = None
        if reset is not None:
            self.reset = reset

    def infer(self, obs: Observation) -> Any:
        self.result.requests += 1
        try:
            chunk = self._infer(obs)
            shape = np.shape(chunk)
            if len(shape) != 2 or shape[1] != self._action_dim:
                raise ValueError(f"the policy returned actions of shape {shape}; the simulator takes {self._action_dim} values per step")
        except BaseException as exc:
            self.error = exc
            if self.executor is not None:
                self.executor.close()
            raise
        return chunk


class _Timings:
    """Listener: per-chunk round trip and server inference time."""

    def __init__(self, result: EpisodeResult) -> None:
        self.result = result

    def on_chunk(self, event: ChunkEvent) -> None:
        self.result.roundtrip_ms.append(float(event.roundtrip_ms))
        if "infer_ms" in event.server_timing:
            self.result.infer_ms.append(float(event.server_timing["infer_ms"]))


def run_episode(
    env: Env,
    infer: Callable[[Observation], Any],
    config: ExecutionConfig,
    index: int,
    seed: int,
    on_frame: Callable[[], None] | None = None,
    reset: Callable[[], Any] | None = None,
    stop: threading.Event | None = None,
    listeners: Sequence[LoopListener] = (),
    metadata: Any = None,
) -> EpisodeResult:
    """Run one episode of ``env`` from ``seed``, getting chunks from ``infer``.

    ``reset`` (the client's, for servers that know the command) clears the
    policy's episode state first. ``on_frame`` is called after the reset and
    after every step (to grab video frames). Setting ``stop`` ends the
    episode after the current step, marked ``interrupted``. A failed request
    ends the episode by raising its error. ``listeners`` (monitor, recorder)
    receive the executor's events, numbered with the episode's ``index``.
    ``metadata`` (the served policy's) says whether ``merge="rtc"`` can work.
    """
    started = time.perf_counter()
    result = EpisodeResult(index=index, seed=seed)
    recorder = _Recorder(env, result, on_frame, stop)
    policy = _Policy(infer, reset, result, env.action_dim, metadata)
    clock = SteppedClock(env.fps, config.sim_latency_steps)
    # The simulator's joint ranges bound the commands; the policy's announced range is not enforced here.
    executor = Executor(policy, recorder, config.executor_config(env.fps), clock=clock, listeners=[_Timings(result), *listeners],
                        use_policy_bounds=False)
    executor.episode = index  # events carry the evaluation's episode number
    recorder.executor = policy.executor = executor
    try:
        executor.run(episodes=1, seed=seed)
    finally:
        executor.close()
    if policy.error is not None:
        raise policy.error
    result.dropped_actions = executor.stats.dropped_actions
    result.held_steps = executor.stats.stalled_ticks
    result.truncated = result.truncated or (not result.terminated and result.length >= config.max_steps)
    result.wall_s = time.perf_counter() - started
    return result
