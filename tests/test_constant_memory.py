"""Constant memory: a loop that runs for days, and evaluation videos of any length.

* :class:`LoopStats` under a million ticks on a stepped clock (with the
  updates the executor makes per tick and per chunk): memory stays flat and
  the status reads the monitor polls at 10 Hz stay O(1);
* a real :class:`Executor` on a stepped clock for about 8 s of wall time
  (at least 100 000 ticks): memory flat between an early and a late checkpoint;
* ``policylink eval --videos``: frames reach the encoder as they are rendered,
  memory stays flat over a long recorded episode, unrecorded episodes render nothing.

Memory is measured with :mod:`tracemalloc` (Python and NumPy allocations).
"""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from policylink.envs.base import Env, StepResult
from policylink.runtime.clock import SteppedClock
from policylink.runtime.events import StepEvent
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.runtime.stats import LoopStats
from policylink.types import Observation

FPS = 30.0
HORIZON = 10
KIB = 1024


@pytest.fixture
def traced() -> Iterator[None]:
    """tracemalloc on for the test (and off again, whatever happens)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        yield
    finally:
        if not was_tracing:
            tracemalloc.stop()


def traced_now() -> int:
    """Bytes currently allocated (after collecting garbage, so only what is kept counts)."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


class TinyEnv(Env):
    """A cheap environment: a 3-value state that follows the action; episodes of ``episode_steps``."""

    name = "tiny"
    action_dim = 3
    fps = FPS

    def __init__(self, episode_steps: int) -> None:
        self.episode_steps = episode_steps
        self._state = np.zeros(3, np.float32)
        self._steps = 0

    def reset(self, seed: int | None = None) -> Observation:
        self._state = np.zeros(3, np.float32)
        self._steps = 0
        return {"observation.state": self._state}

    def step(self, action: np.ndarray) -> StepResult:
        self._state = np.asarray(action, np.float32)
        self._steps += 1
        return StepResult({"observation.state": self._state}, truncated=self._steps >= self.episode_steps)

    def state(self) -> np.ndarray | None:
        return self._state

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        return np.full(3, -1.0, np.float32), np.full(3, 1.0, np.float32)


def ramp_policy(obs: Observation, horizon: int = HORIZON) -> np.ndarray:
    """A plain function as the policy: a short ramp, offset by the request's step (so chunk boundaries jump)."""
    offset = 0.01 * (int(obs.get("step", 0)) % 7)
    return np.linspace(0.0, 0.1, horizon, dtype=np.float32)[:, None] + np.full((1, 3), offset, np.float32)


class ExecutorLikeDriver:
    """Makes the calls the executor makes into its :class:`LoopStats`, on a :class:`SteppedClock`.

    Per tick ``stats.tick(now, stalled)`` (a 2-tick stall every 97 ticks);
    per chunk (every ``HORIZON`` ticks) a round trip, an accepted chunk,
    dropped actions and a boundary jump; now and then a rejected / stale
    chunk, an error and a watchdog trip; an episode every 50 000 ticks.
    """

    def __init__(self, stats: LoopStats) -> None:
        self.stats = stats
        self.clock = SteppedClock(FPS)
        self.expected_stalled = 0

    def run(self, ticks: int) -> None:
        stats, clock = self.stats, self.clock
        for _ in range(ticks):
            clock.wait_tick()
            i = clock.ticks
            stalled = i % 97 < 2
            self.expected_stalled += stalled
            stats.tick(clock.now(), stalled)
            if i % HORIZON == 0:
                stats.roundtrips_ms.append(20.0 + i % 13)
                stats.chunks += 1
                stats.dropped_actions += 1
                stats.boundary_jumps.append(0.01 * (i % 7))
            if i % 10_007 == 0:
                stats.rejected_chunks += 1
                stats.stale_chunks += 1
                stats.errors += 1
                stats.watchdog_trips += 1
            if i % 50_000 == 0:
                stats.end_episode()
                stats.episodes += 1


def test_a_million_ticks_of_loop_stats_in_flat_memory(traced):
    stats = LoopStats(fps=FPS)
    driver = ExecutorLikeDriver(stats)
    driver.run(100_000)
    after_1e5 = traced_now()
    driver.run(900_000)
    after_1e6 = traced_now()
    growth = after_1e6 - after_1e5
    print(f"LoopStats: traced {after_1e5 / KIB:.0f} KiB after 1e5 ticks, {after_1e6 / KIB:.0f} KiB after 1e6 (growth {growth} B)")
    assert growth < 64 * KIB, f"memory grew by {growth / KIB:.0f} KiB from 1e5 to 1e6 ticks"

    # The whole-run figures are still exact.
    summary = stats.summary()
    assert summary["ticks"] == 1_000_000 and summary["episodes"] == 20
    assert summary["stalled_ticks"] == driver.expected_stalled
    assert summary["stall_fraction"] == pytest.approx(driver.expected_stalled / 1e6, abs=1e-4)
    assert summary["fps_achieved"] == pytest.approx(FPS)
    assert summary["chunks"] == 100_000 and summary["dropped_actions"] == 100_000
    assert summary["max_boundary_jump"] == pytest.approx(0.06)
    assert summary["roundtrip_p50_ms"] == pytest.approx(26.0, abs=1.0)
    assert summary["rejected_chunks"] == 1_000_000 // 10_007


def test_status_reads_stay_constant_time():
    """What ``Executor.status()`` reads (the monitor polls it at 10 Hz) costs the same at 1e4 and 1e6 ticks."""
    executor = Executor(ramp_policy, TinyEnv(10), ExecutorConfig(), clock=SteppedClock(FPS))
    try:
        stats = executor.stats = LoopStats(fps=FPS)
        driver = ExecutorLikeDriver(stats)

        def seconds_per_read() -> float:
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(20):
                    executor.status()
                best = min(best, (time.perf_counter() - started) / 20)
            return best

        driver.run(10_000)
        early = seconds_per_read()
        driver.run(990_000)
        late = seconds_per_read()
        print(f"status(): {early * 1e6:.1f} us per read at 1e4 ticks, {late * 1e6:.1f} us at 1e6")
        assert executor.status()["fps"] == pytest.approx(FPS)
        assert late < 2 * early + 20e-6, f"a status read took {early * 1e6:.1f} us at 1e4 ticks and {late * 1e6:.1f} us at 1e6"
    finally:
        executor.close()


class Checkpoints:
    """Listener (on the control thread): memory at an early tick and at the end of the run.

    Tracing starts at ``trace_tick`` (tracemalloc slows every allocation,
    so the warm-up runs untraced); memory is taken at ``early_tick`` and
    once at least ``min_ticks`` ticks ran and ``duration_s`` of wall time
    passed (or at ``max_ticks``); :attr:`done` is then set.
    """

    def __init__(self, executor: Executor, trace_tick: int, early_tick: int, min_ticks: int, max_ticks: int, duration_s: float) -> None:
        self.executor = executor
        self.trace_tick, self.early_tick, self.min_ticks, self.max_ticks = trace_tick, early_tick, min_ticks, max_ticks
        self.deadline = time.perf_counter() + duration_s
        self.started_tracing = False
        self.early: tuple[int, int] | None = None
        self.late: tuple[int, int] | None = None
        self.done = threading.Event()

    def on_step(self, event: StepEvent) -> None:
        if self.done.is_set():
            return
        ticks = self.executor.stats.ticks
        if ticks == self.trace_tick and not tracemalloc.is_tracing():
            tracemalloc.start()
            self.started_tracing = True
        elif ticks == self.early_tick:
            self.early = (ticks, traced_now())
        elif ticks >= self.min_ticks and (ticks >= self.max_ticks or time.perf_counter() >= self.deadline):
            self.late = (ticks, traced_now())
            self.done.set()

    def stop_tracing(self) -> None:
        if self.started_tracing:
            tracemalloc.stop()


def test_a_real_executor_runs_in_flat_memory():
    """An Executor on a stepped clock, a plain function as the policy, for about 8 s (at least 100k ticks)."""
    def policy(obs: Observation) -> np.ndarray:
        return ramp_policy(obs, horizon=40)

    config = ExecutorConfig(mode="async", n_action_steps=40, threshold=0.5)
    # Latency 2 ticks: async requests (one every 20 ticks), latency compensation and dropped actions all run.
    executor = Executor(policy, TinyEnv(episode_steps=20_000), config, clock=SteppedClock(FPS, latency_steps=2))
    # Early: well after every window (10 000 ticks, 1 000 chunks) filled, and after tracing warmed up.
    checkpoints = Checkpoints(executor, trace_tick=20_000, early_tick=30_000, min_ticks=100_000, max_ticks=5_000_000, duration_s=8.0)
    executor.add_listener(checkpoints)
    polls = 0
    try:
        executor.start(episodes=None)
        deadline = time.monotonic() + 300.0
        # Poll the status as the monitor does (10 Hz) while waiting for the end of the run.
        while not checkpoints.done.wait(0.1):
            assert time.monotonic() < deadline, f"only {executor.stats.ticks} ticks in 300 s"
            status = executor.status()
            assert status["state"] != "finished", "the loop ended early"
            polls += 1
    finally:
        executor.close()
        checkpoints.stop_tracing()
    assert checkpoints.early is not None and checkpoints.late is not None
    (early_ticks, early_bytes), (late_ticks, late_bytes) = checkpoints.early, checkpoints.late
    growth = late_bytes - early_bytes
    print(
        f"Executor: {late_ticks} ticks, {executor.stats.chunks} chunks, {executor.stats.episodes} episodes, {polls} status polls; "
        f"traced {early_bytes / KIB:.0f} KiB at tick {early_ticks}, {late_bytes / KIB:.0f} KiB at tick {late_ticks} (growth {growth} B)"
    )
    # The allowance covers the executor's per-episode results (a few hundred bytes per 20 000-tick episode).
    assert growth < 256 * KIB, f"memory grew by {growth / KIB:.0f} KiB from tick {early_ticks} to tick {late_ticks}"
    summary = executor.stats.summary()
    assert summary["ticks"] >= 100_000 and summary["chunks"] >= 5_000
    assert summary["fps_achieved"] == pytest.approx(FPS) and summary["errors"] == 0


# -- evaluation videos -------------------------------------------------------

FRAME = (128, 128, 3)  # 48 KiB a frame
VIDEO_STEPS = 600  # about 28 MiB of frames if an episode's video were kept in memory


class FrameEnv(Env):
    """An evaluation environment (duck-typed like the simulators) that renders a fresh frame per call.

    At every step it notes how far the video encoder is behind the frames
    rendered so far, and memory at an early and a late step.
    """

    name = "frames"
    action_dim = 2
    fps = FPS
    max_episode_steps = VIDEO_STEPS

    def __init__(self, appended: list[int]) -> None:
        self.appended = appended  # frames the encoder received (counted by the test's writer wrapper)
        self.rendered: list[int] = []  # frames rendered, per episode
        self.max_lag = 0
        self.memory: dict[int, int] = {}
        self._steps = 0

    def reset(self, seed: int | None = None) -> Observation:
        self._steps = 0
        self.rendered.append(0)
        return {"observation.state": np.zeros(2, np.float32)}

    def step(self, action: np.ndarray) -> StepResult:
        self._steps += 1
        if len(self.rendered) == 1:  # the recorded episode
            self.max_lag = max(self.max_lag, self.rendered[0] - self.appended[0])
            if self._steps in (100, VIDEO_STEPS - 1):
                self.memory[self._steps] = traced_now()
        return StepResult({"observation.state": np.zeros(2, np.float32)}, truncated=self._steps >= VIDEO_STEPS)

    def render(self) -> np.ndarray:
        self.rendered[-1] += 1
        return np.full(FRAME, self._steps % 256, np.uint8)

    def state(self) -> np.ndarray | None:
        return None

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        return np.full(2, -1.0, np.float32), np.full(2, 1.0, np.float32)


@pytest.fixture
def counted_writer(monkeypatch) -> list[int]:
    """Wraps imageio's writer: counts the frames handed to the encoder (``[count]``)."""
    imageio = pytest.importorskip("imageio.v2")
    appended = [0]
    real_get_writer = imageio.get_writer

    class Counting:
        def __init__(self, writer: Any) -> None:
            self.writer = writer

        def append_data(self, frame: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            appended[0] += 1
            return self.writer.append_data(frame, *args, **kwargs)

        def close(self) -> None:
            self.writer.close()

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    monkeypatch.setattr(imageio, "get_writer", lambda *args, **kwargs: Counting(real_get_writer(*args, **kwargs)))
    return appended


def test_eval_videos_stream_frames_to_the_encoder(serve, tmp_path, traced, counted_writer):
    import imageio.v2 as imageio

    from policylink.evaluation import EvalConfig, evaluate
    from policylink.policies.builtin import ConstantPolicy

    env = FrameEnv(counted_writer)
    server = serve(ConstantPolicy(action_dim=2, horizon=50))
    config = EvalConfig(env="frames", episodes=2, num_envs=1, max_steps=VIDEO_STEPS, videos=1, out=tmp_path / "run")
    report = evaluate(server.url, config, env_factory=lambda: env)

    growth = env.memory[VIDEO_STEPS - 1] - env.memory[100]
    frame_bytes = int(np.prod(FRAME))
    print(
        f"eval video: traced {env.memory[100] / KIB:.0f} KiB at step 100, {env.memory[VIDEO_STEPS - 1] / KIB:.0f} KiB "
        f"at step {VIDEO_STEPS - 1} (growth {growth} B; {VIDEO_STEPS - 101} frames would be {(VIDEO_STEPS - 101) * frame_bytes / 2**20:.1f} MiB)"
    )
    # Every frame rendered so far was already with the encoder at each step: none is waiting in a list.
    assert env.max_lag == 0
    assert growth < 20 * frame_bytes, f"memory grew by {growth / KIB:.0f} KiB over {VIDEO_STEPS - 101} recorded steps"
    # Only the first episode is recorded; the second renders nothing at all.
    assert env.rendered == [VIDEO_STEPS + 1, 0] and counted_writer[0] == VIDEO_STEPS + 1
    assert [episode.video for episode in report.episodes] == ["videos/episode_0000.mp4", None]
    assert sorted(p.name for p in (tmp_path / "run" / "videos").iterdir()) == ["episode_0000.mp4"]
    with imageio.get_reader(tmp_path / "run" / "videos" / "episode_0000.mp4") as video:
        frames = sum(1 for _ in video)
    assert frames == VIDEO_STEPS + 1  # the reset, then every step
