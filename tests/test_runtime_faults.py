"""Fault injection against the executor with its default settings: no crash, no command out of bounds, no jump.

Each case drives a fake 6-d arm at 30 Hz (real time) with a real client. The
server is policylink's own (killed for 3 s, frozen for 3 s), or a bare
openpi-style server that sends whatever its policy returns, unchecked (NaN,
1e6, the wrong width, a first chunk that is always refused): the client's
own checks are what keeps the arm safe there. "Normal" is the largest
per-tick change of the trajectory the policy plays.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from conftest import free_port

from policylink import PolicyClient
from policylink.codec import Packer, unpackb
from policylink.envs.fake import FakeEnv
from policylink.policies import ReplayPolicy
from policylink.policies.builtin import sine_trajectory
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.server.background import BackgroundServer

TRAJECTORY = sine_trajectory(600, 6)
NORMAL = float(np.max(np.abs(np.diff(TRAJECTORY, axis=0))))  # the trajectory's own largest per-tick change


class Recorder:
    """Listener: every executed command and chunk, with an event to wait on."""

    def __init__(self) -> None:
        self.steps, self.chunks, self.episodes = [], [], []
        self._changed = threading.Condition()

    def on_step(self, event):
        with self._changed:
            self.steps.append(event)
            self._changed.notify_all()

    def on_chunk(self, event):
        with self._changed:
            self.chunks.append(event)
            self._changed.notify_all()

    def on_episode(self, event):
        with self._changed:
            self.episodes.append(event)
            self._changed.notify_all()

    def wait(self, condition, timeout: float = 30.0) -> None:
        with self._changed:
            assert self._changed.wait_for(condition, timeout), f"not reached in {timeout} s ({len(self.steps)} steps, {len(self.chunks)} chunks)"


def assert_safe(recorder: Recorder, env: FakeEnv, bounds=None) -> None:
    """No command out of the arm's ranges (or the policy's, widened), none non-finite, no tick moving more than 3x normal."""
    commands = np.array([event.action for event in recorder.steps if event.action is not None])
    assert np.all(np.isfinite(commands))
    low, high = env.action_bounds()
    assert np.all(commands >= low) and np.all(commands <= high)
    if bounds is not None:
        assert np.all(commands >= bounds.low) and np.all(commands <= bounds.high)
    largest = float(np.max(np.abs(np.diff(commands, axis=0)))) if len(commands) > 1 else 0.0
    assert largest <= 3 * NORMAL, f"a tick moved {largest:.4f}; normal is {NORMAL:.4f}"


def start(executor: Executor, recorder: Recorder, steps: int = 30) -> None:
    executor.start()
    recorder.wait(lambda: len(recorder.steps) >= steps)


# -- policylink's server: killed, frozen -----------------------------------------------------


class Freezable(ReplayPolicy):
    """The sine trajectory; one call can be made to hang for ``freeze_s``."""

    def __init__(self) -> None:
        super().__init__(action_dim=6, horizon=16)
        self.freeze_next = threading.Event()

    def session(self):
        return self  # one client: keep the switch on the object the test holds

    def _chunk(self, obs):
        if self.freeze_next.is_set():
            self.freeze_next.clear()
            time.sleep(3.0)
        return super()._chunk(obs)


def test_server_killed_for_3_s():
    port = free_port()
    server = BackgroundServer(ReplayPolicy(action_dim=6, horizon=16), host="127.0.0.1", port=port).start()
    env, recorder = FakeEnv(episode_steps=10**6, image_size=(24, 32)), Recorder()
    client = PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=10)
    executor = Executor(client, env, ExecutorConfig(), listeners=[recorder])
    try:
        start(executor, recorder)
        server.stop()
        time.sleep(3.0)  # the outage itself: the fault being injected, not a wait for the code under test
        trips = executor.stats.watchdog_trips
        server = BackgroundServer(ReplayPolicy(action_dim=6, horizon=16), host="127.0.0.1", port=port).start()
        recovered = len(recorder.steps)
        recorder.wait(lambda: sum(event.fresh for event in recorder.steps[recovered:]) >= 60)
    finally:
        executor.close()
        client.close()
        server.stop()
    assert trips >= 1  # reported: the watchdog tripped during the outage
    assert executor.stats.errors + executor.stats.stale_chunks >= 1  # and the failed or late replies counted
    assert_safe(recorder, env, executor.bounds)


def test_server_frozen_for_3_s():
    policy = Freezable()
    server = BackgroundServer(policy, host="127.0.0.1", port=0).start()
    env, recorder = FakeEnv(episode_steps=10**6, image_size=(24, 32)), Recorder()
    client = PolicyClient(server.url)
    executor = Executor(client, env, ExecutorConfig(), listeners=[recorder])
    try:
        start(executor, recorder)
        policy.freeze_next.set()
        recorder.wait(lambda: executor.stats.watchdog_trips >= 1)
        recorder.wait(lambda: executor.stats.stale_chunks >= 1)  # the frozen request's late chunk is refused as stale
        resumed = len(recorder.steps)
        recorder.wait(lambda: sum(event.fresh for event in recorder.steps[resumed:]) >= 60)
    finally:
        executor.close()
        client.close()
        server.stop()
    rejected = [chunk for chunk in recorder.chunks if not chunk.accepted]
    assert rejected and all("stale" in chunk.reason for chunk in rejected)
    assert_safe(recorder, env, executor.bounds)


# -- a server that checks nothing ---------------------------------------------------------------


class UncheckedServer:
    """An openpi-style WebSocket server that sends whatever ``make_chunk(step)`` returns, unchecked."""

    def __init__(self, make_chunk, action_dim: int = 6, bounds: tuple | None = None) -> None:
        self.make_chunk, self.requests = make_chunk, 0
        self.metadata = {"action_dim": action_dim, "horizon": 16}
        if bounds is not None:
            self.metadata.update(action_low=list(bounds[0]), action_high=list(bounds[1]))
        self.port, self._stop, self._ready = free_port(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        async def handler(ws):
            packer = Packer()
            await ws.send(packer.pack(self.metadata))
            async for message in ws:
                request = unpackb(message)
                if "__command__" in request:
                    await ws.send(packer.pack({"ok": True}))
                    continue
                self.requests += 1
                await ws.send(packer.pack({"actions": self.make_chunk(int(request.get("step", 0)))}))

        async with serve(handler, "127.0.0.1", self.port, max_size=None):
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.02)

    def __enter__(self) -> UncheckedServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def trajectory_chunk(step: int) -> np.ndarray:
    return TRAJECTORY[np.arange(step, step + 16) % len(TRAJECTORY)].copy()


BOUNDS = (TRAJECTORY.min(axis=0), TRAJECTORY.max(axis=0))


@pytest.mark.parametrize("fault, reason", [("nan", "non-finite value"), ("huge", "outside the policy's action range")])
def test_a_bad_chunk_mid_run_is_refused_and_reported(fault, reason):
    bad = threading.Event()

    def make_chunk(step):
        chunk = trajectory_chunk(step)
        if bad.is_set():
            bad.clear()
            chunk[3, 2] = np.nan if fault == "nan" else 1e6
        return chunk

    env, recorder = FakeEnv(episode_steps=10**6, image_size=(24, 32)), Recorder()
    with UncheckedServer(make_chunk, bounds=BOUNDS) as server, PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        executor = Executor(client, env, ExecutorConfig(), listeners=[recorder])
        try:
            start(executor, recorder)
            bad.set()
            recorder.wait(lambda: any(not chunk.accepted for chunk in recorder.chunks))
            after = len(recorder.steps)
            recorder.wait(lambda: sum(event.fresh for event in recorder.steps[after:]) >= 30)
        finally:
            executor.close()
    (rejected,) = [chunk for chunk in recorder.chunks if not chunk.accepted]
    assert reason in rejected.reason and executor.stats.rejected_chunks == 1
    assert_safe(recorder, env, executor.bounds)


@pytest.mark.parametrize("case", ["wrong width", "always out of range"])
def test_a_first_chunk_that_is_always_refused_ends_the_episode_with_a_clear_error(case):
    width, value = (3, 0.0) if case == "wrong width" else (6, 1e6)
    env, recorder = FakeEnv(episode_steps=10**6, image_size=(24, 32)), Recorder()
    with UncheckedServer(lambda step: np.full((16, width), value, np.float32), action_dim=width, bounds=(np.full(width, -1.0), np.full(width, 1.0))) as server, \
            PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        executor = Executor(client, env, ExecutorConfig(), listeners=[recorder], bounds=(-1.0, 1.0))
        started = time.monotonic()
        executor.run(episodes=1)  # returns: the episode ends by itself
        elapsed = time.monotonic() - started
        executor.close()
        requests = server.requests
    assert recorder.steps == []  # nothing reached the arm
    (ended,) = [event for event in recorder.episodes if not event.started]
    error = ended.info["error"]
    assert "no usable first chunk after 10 attempts" in error
    assert ("has 3 values per action, expected 6" if case == "wrong width" else "outside the policy's action range") in error
    assert requests == 10 and executor.stats.rejected_chunks == 10  # bounded, backing off: not thousands of requests
    assert 2.0 < elapsed < 20.0
