"""The executor against a real local server with built-in policies.

The replay policy starts each chunk at the observation's ``step``, so with
exact latency compensation the action executed at step ``k`` is
``trajectory[k]``. Stalls are counted, never timed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from policylink.client import PolicyClient
from policylink.envs.fake import FakeEnv
from policylink.policies.builtin import ConstantPolicy, ReplayPolicy
from policylink.runtime.clock import SteppedClock
from policylink.runtime.events import ChunkEvent, EpisodeEvent, StepEvent
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.runtime.filters import ActionMapping, ChunkValidator, JointLimits, ReadyPose
from policylink.server.background import BackgroundServer

from conftest import free_port

CAMERAS = {"front": (24, 32)}


class Events:
    """A listener that keeps every event (thread-safe reads for tests); :meth:`wait_until` waits on them."""

    def __init__(self) -> None:
        self.steps: list[StepEvent] = []
        self.chunks: list[ChunkEvent] = []
        self.episodes: list[EpisodeEvent] = []
        self.order: list[str] = []
        self._arrived = threading.Condition()

    def _keep(self, kept: list, event: Any, kind: str) -> None:
        with self._arrived:
            kept.append(event)
            self.order.append(kind)
            self._arrived.notify_all()

    def on_step(self, event: StepEvent) -> None:
        self._keep(self.steps, event, "step")

    def on_chunk(self, event: ChunkEvent) -> None:
        self._keep(self.chunks, event, "chunk")

    def on_episode(self, event: EpisodeEvent) -> None:
        self._keep(self.episodes, event, "episode")

    def wait_until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Block until ``condition()`` (about the events kept) holds; it is re-checked at each new event."""
        with self._arrived:
            if not self._arrived.wait_for(condition, timeout):
                raise AssertionError(f"condition not reached in time ({len(self.steps)} steps, {len(self.chunks)} chunks, {len(self.episodes)} episode events)")


def replay_policy(latency_ms: float = 0.0, horizon: int = 16, action_dim: int = 6) -> ReplayPolicy:
    return ReplayPolicy(action_dim=action_dim, horizon=horizon, cameras=CAMERAS, latency_ms=latency_ms)


def fake_env(steps: int = 60, layout: str = "single", lag: float = 0.5) -> FakeEnv:
    return FakeEnv(layout, image_size=CAMERAS["front"], episode_steps=steps, lag=lag)


def run_loop(url: str, config: ExecutorConfig, steps: int = 60, **options) -> tuple[Executor, Events]:
    events = Events()
    with PolicyClient(url) as client:
        executor = Executor(client, fake_env(steps), config, listeners=[events], **options)
        executor.run(episodes=1)
        executor.close()
    return executor, events


# -- simulated time: exact numbers ---------------------------------------------


def test_sync_stalls_once_per_chunk_and_compensation_drops_exactly_the_elapsed_actions(serve):
    policy = replay_policy()
    server = serve(policy)
    latency = 3
    # Compensation arithmetic, exactly: the resume ramp (which smooths each restart after a stall) is opted out of.
    executor, events = run_loop(server.url, ExecutorConfig(mode="sync", n_action_steps=8, resume_max_delta=1e6), clock=SteppedClock(30, latency))
    stats = executor.stats
    assert stats.ticks == 60
    assert stats.stalls == stats.chunks - 1  # the first chunk is awaited before the episode starts
    assert stats.stalled_ticks == latency * stats.stalls
    assert stats.dropped_actions == latency * (stats.chunks - 1)
    fresh = [event for event in events.steps if event.fresh]
    assert len(fresh) == 60 - stats.stalled_ticks
    for event in fresh:  # StepEvent.step is the step the action belongs to
        np.testing.assert_array_equal(event.action, policy.trajectory[event.step])
    for event in events.steps:
        if not event.fresh:  # a held tick repeats the last command, never a stale action
            assert event.chunk_id is None
            previous = events.steps[events.steps.index(event) - 1]
            np.testing.assert_array_equal(event.action, previous.action)


def test_without_compensation_actions_lag_by_the_latency(serve):
    policy = replay_policy()
    server = serve(policy)
    config = ExecutorConfig(mode="sync", n_action_steps=8, compensate=False, resume_max_delta=1e6)  # exact lag: no resume ramp
    _, events = run_loop(server.url, config, clock=SteppedClock(30, 3))
    lagging = [event for event in events.steps if event.fresh and event.step >= 8]
    assert lagging
    assert not any(np.array_equal(event.action, policy.trajectory[event.step]) for event in lagging[:1])
    chunk_starts = {chunk.obs_step for chunk in events.chunks}
    first_after = next(event for event in events.steps if event.fresh and event.step >= 8)
    assert first_after.step - 3 in chunk_starts  # the action belongs to an observation 3 steps old
    np.testing.assert_array_equal(first_after.action, policy.trajectory[first_after.step - 3])


@pytest.mark.parametrize("merge", ["latest", "average", "ensemble"])
def test_async_never_stalls_in_simulated_time(serve, merge):
    policy = replay_policy()
    server = serve(policy)
    config = ExecutorConfig(mode="async", n_action_steps=12, merge=merge, resume_max_delta=1e6)  # exact merges: no start ramp
    executor, events = run_loop(server.url, config, clock=SteppedClock(30, 3))
    assert executor.stats.stalls == 0 and executor.stats.ticks == 60
    assert executor.stats.chunks > 4
    for event in events.steps:
        # Every rule merges predictions of the same trajectory step, so all agree exactly.
        np.testing.assert_allclose(event.action, policy.trajectory[event.step], atol=1e-6)


def test_stale_chunks_are_rejected_and_never_executed(serve):
    server = serve(replay_policy())
    config = ExecutorConfig(mode="sync", n_action_steps=8, watchdog_s=0.2)
    executor, events = run_loop(server.url, config, steps=40, clock=SteppedClock(30, 10))  # 10 steps = 0.33 s > 0.2 s
    assert executor.stats.chunks == 1  # only the first chunk (its delay is not simulated)
    assert executor.stats.stale_chunks >= 2
    assert all("stale" in chunk.reason for chunk in events.chunks if not chunk.accepted)
    assert [event.fresh for event in events.steps[:8]] == [True] * 8
    assert not any(event.fresh for event in events.steps[8:])
    assert executor.stats.watchdog_trips == 1


# -- real time ---------------------------------------------------------------


def test_real_time_async_has_no_stalls_where_sync_stalls_every_chunk(serve):
    server = serve(replay_policy(latency_ms=50.0))
    sync, _ = run_loop(server.url, ExecutorConfig(mode="sync", fps=30, n_action_steps=12), steps=40)
    assert sync.stats.chunks >= 3
    assert sync.stats.stalls == sync.stats.chunks - 1
    asynchronous, events = run_loop(server.url, ExecutorConfig(mode="async", fps=30, n_action_steps=12, threshold=0.75), steps=40)
    assert asynchronous.stats.stalls == 0
    assert asynchronous.stats.chunks >= 3
    assert all(event.fresh for event in events.steps)
    summary = asynchronous.stats.summary()
    assert summary["roundtrip_p50_ms"] >= 50.0  # the policy sleeps 50 ms per request
    assert summary["fps_achieved"] > 0 and summary["ticks"] == 40


def test_events_reach_listeners_in_order(serve):
    server = serve(replay_policy())
    _, events = run_loop(server.url, ExecutorConfig(mode="async", fps=100, n_action_steps=8), steps=20)
    assert events.order[0] == "episode" and events.order[1] == "chunk" and events.order[-1] == "episode"
    assert events.episodes[0].started and not events.episodes[-1].started
    assert events.episodes[-1].steps == 20
    assert [event.step for event in events.steps] == list(range(20))  # step 0 is the reset observation's
    assert all(event.observation["observation.state"].shape == (6,) for event in events.steps)
    assert events.steps[-1].done


def test_watchdog_holds_when_the_server_dies_and_the_loop_recovers(serve):
    port = free_port()
    policy = replay_policy(horizon=8)
    first = BackgroundServer(policy, host="127.0.0.1", port=port).start()
    events = Events()
    client = PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=30, timeout=5)
    config = ExecutorConfig(mode="async", fps=50, n_action_steps=8, watchdog_s=0.2)
    executor = Executor(client, fake_env(steps=100_000), config, listeners=[events])
    second: BackgroundServer | None = None
    try:
        executor.start()
        wait_for(lambda: executor.stats.chunks >= 3)
        first.stop()
        wait_for(lambda: executor.stats.watchdog_trips >= 1)
        assert executor.status()["state"] == "holding"
        held_from = len(events.steps)
        events.wait_until(lambda: len(events.steps) >= held_from + 5)
        held = [event for event in events.steps[held_from:] if not event.fresh]
        assert held and all(np.array_equal(event.action, held[0].action) for event in held)
        chunks_before = executor.stats.chunks
        second = BackgroundServer(replay_policy(horizon=8), host="127.0.0.1", port=port).start()
        wait_for(lambda: executor.stats.chunks >= chunks_before + 12)  # time for the ramp to close the gap the outage left
        assert executor.status()["state"] == "running"
        recovered = [event for event in events.steps[held_from:] if event.fresh]
        assert recovered
        # After the outage the command rejoins the trajectory in bounded steps (no jump), then follows it exactly.
        normal = np.max(np.abs(np.diff(policy.trajectory, axis=0)))
        executed = [held[-1].action] + [event.action for event in recovered]
        assert max(float(np.max(np.abs(b - a))) for a, b in zip(executed, executed[1:])) <= 3 * normal
        for event in recovered[-3:]:  # caught up: the actions of the present step
            np.testing.assert_array_equal(event.action, policy.trajectory[event.step % len(policy.trajectory)])
    finally:
        executor.close()
        client.close()
        first.stop()
        if second is not None:
            second.stop()


def test_rejected_chunks_are_reported_and_never_executed(serve):
    server = serve(ConstantPolicy(value=5.0, action_dim=6, cameras=CAMERAS))
    events = Events()
    with PolicyClient(server.url) as client:
        validator = ChunkValidator(action_dim=6, limits=JointLimits(-1, 1))
        executor = Executor(client, fake_env(), ExecutorConfig(fps=50), validator=validator, listeners=[events])
        executor.start()
        events.wait_until(lambda: len(events.chunks) >= 2)
        executor.close()
    assert events.chunks and not any(chunk.accepted for chunk in events.chunks)
    assert "leaves the joint limits: 5 at step 0, joint 0" in events.chunks[0].reason
    assert events.steps == []  # nothing was executed
    assert executor.stats.rejected_chunks >= 2


def test_action_mapping_and_ready_pose_inside_the_loop(serve):
    policy = replay_policy()  # 6-d policy driving a 12-d robot: the second arm holds
    server = serve(policy)
    env = FakeEnv("bimanual", image_size=(24, 32), episode_steps=20, lag=1.0)
    pose = np.linspace(-0.2, 0.2, 12).astype(np.float32)
    events = Events()
    with PolicyClient(server.url) as client:

        def infer(obs):  # the policy sees the first arm only
            return client.infer({**obs, "observation.state": obs["observation.state"][:6]})

        executor = Executor(
            infer, env, ExecutorConfig(mode="sync", fps=100, n_action_steps=8, resume_max_delta=1e6),  # exact first action: no ramp
            filters=[ActionMapping(12, range(6))], ready_pose=ReadyPose(pose, steps=5), listeners=[events],
        )
        executor.run(episodes=1)
        executor.close()
    first = events.steps[0]
    np.testing.assert_allclose(first.action[6:], pose[6:], atol=1e-6)  # held at the ready pose
    np.testing.assert_array_equal(first.action[:6], policy.trajectory[0])
    assert all(np.allclose(event.action[6:], pose[6:]) for event in events.steps)


def test_loop_control_from_another_thread(serve):
    server = serve(replay_policy())
    events = Events()
    with PolicyClient(server.url) as client:
        executor = Executor(client, fake_env(steps=100_000), ExecutorConfig(fps=100, n_action_steps=8), listeners=[events])
        executor.start()
        events.wait_until(lambda: len(events.steps) >= 5)
        executor.stop()
        wait_for(lambda: executor.status()["state"] == "paused")
        paused_at = len(events.steps)
        # Resets while paused, timed by the loop itself: the paused loop notices each one after a
        # full poll of its run flag (50 ms, five control periods), ends the episode, starts the
        # next one and fetches its first chunk (two requests to the server), then pauses again
        # instead of executing it. A paused loop sends no commands all that time.
        resets = 4
        for episode in range(1, resets + 1):
            executor.reset_episode()
            events.wait_until(lambda episode=episode: len(events.episodes) >= 2 * episode + 1)  # the last one ended, this one started
            wait_for(lambda: executor.status()["state"] == "paused")
            first = events.chunks[-1]
            assert first.episode == episode and first.accepted  # the episode's first chunk arrived, and was not executed
            assert len(events.steps) == paused_at  # a paused loop sends no commands
        executor.start()
        events.wait_until(lambda: len(events.steps) >= paused_at + 5)
        status = executor.status()
        assert status["episode"] == resets and status["running"]
        ended = events.episodes[1::2]
        assert len(ended) == resets and all(not event.started and event.info["reason"] == "operator reset" for event in ended)
        assert {event.episode for event in events.steps[paused_at:]} == {resets}
        executor.close()
        assert executor.status()["state"] == "finished"


def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll executor state that offers no event to wait on (its status, its statistics, threads)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_loop_threads_end_with_the_loop(serve):
    server = serve(replay_policy())
    run_loop(server.url, ExecutorConfig(mode="async", fps=200, n_action_steps=8), steps=10)

    def loop_threads() -> list[str]:
        return [thread.name for thread in threading.enumerate() if thread.name.startswith(("policylink-request", "policylink-control"))]

    wait_for(lambda: not loop_threads())


def test_reset_while_waiting_for_the_first_chunk_starts_one_new_episode(serve):
    server = serve(replay_policy(latency_ms=300.0))
    events = Events()
    with PolicyClient(server.url) as client:
        executor = Executor(client, fake_env(steps=100_000), ExecutorConfig(fps=100, n_action_steps=8), listeners=[events])
        executor.start()
        wait_for(lambda: executor.status()["state"] == "waiting")
        executor.reset_episode()
        events.wait_until(lambda: len(events.steps) >= 3)
        executor.close()
    ended = [event for event in events.episodes if not event.started]
    assert ended[0].info["reason"] == "operator reset" and ended[0].steps == 0
    assert {event.episode for event in events.steps} == {1}  # exactly one new episode, which runs


def test_first_chunk_timeouts_are_retried_until_one_arrives(serve):
    server = serve(replay_policy(latency_ms=300.0))
    events = Events()
    with PolicyClient(server.url, timeout=0.1) as client:  # every request times out
        executor = Executor(client, fake_env(steps=5), ExecutorConfig(fps=100, n_action_steps=8), listeners=[events])
        executor.start(episodes=1)
        wait_for(lambda: executor.stats.errors >= 2)  # InferenceTimeout counted, a new request sent each time
        assert events.steps == [] and executor.status()["state"] == "waiting"
        client.timeout = 5.0
        executor.join(30)
        executor.close()
    assert len(events.steps) == 5 and executor.stats.chunks >= 1
