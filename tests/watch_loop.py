"""A small real control loop for the monitor and recorder tests.

It talks to a real server through a real :class:`PolicyClient`, steps a tiny
environment with moving camera pictures, and emits the loop's real events
(:mod:`policylink.runtime.events`) to its listeners. It implements
:class:`LoopControl`, so the monitor's buttons act on it.

Tests wait on the loop's own progress (:meth:`TinyLoop.wait_until`) instead of
sleeping: every step, episode change and idle poll of a stopped loop wakes
the waiters.

:func:`chromium` opens Debian's headless Chromium through selenium for the
tests that check the page in a real browser.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from policylink.client import PolicyClient
from policylink.runtime.events import ChunkEvent, EpisodeEvent, StepEvent

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
#: Why the browser tests skip where Debian's chromium is missing.
NO_CHROMIUM = "needs Debian's chromium and chromium-driver (make test installs them)"


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium driven by selenium, with a fresh profile; quit afterwards."""
    import pytest

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="policylink-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: selenium downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Re-check ``predicate`` (browser state, which offers no event to wait on) until it holds, up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


class PictureEnv:
    """An arm whose state follows the actions, seen by cameras showing a moving bar."""

    def __init__(self, cameras: dict[str, tuple[int, int]], action_dim: int = 6, episode_steps: int = 40) -> None:
        self.cameras = cameras
        self.action_dim = action_dim
        self.episode_steps = episode_steps
        self.state = np.zeros(action_dim, np.float32)
        self.t = 0

    def reset(self) -> dict[str, Any]:
        self.state[:] = 0
        self.t = 0
        return self.observation()

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool]:
        self.state = 0.5 * self.state + 0.5 * action.astype(np.float32)
        self.t += 1
        return self.observation(), self.t >= self.episode_steps

    def observation(self) -> dict[str, Any]:
        obs: dict[str, Any] = {"observation.state": self.state.copy(), "task": "watch the bar"}
        for index, (name, size) in enumerate(self.cameras.items()):
            obs[f"observation.images.{name}"] = bar_frame(self.t, index, size)
        return obs


def bar_frame(t: int, index: int, size: tuple[int, int]) -> np.ndarray:
    """A camera picture easy to check by eye: a tinted background (one colour per camera) and a bar moving with ``t``."""
    height, width = size
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., index % 3] = 60
    column = (t * 7) % width
    frame[:, column : column + max(2, width // 10)] = (255, 220, 0)
    return frame


class TinyLoop:
    """Synchronous chunk execution at ``fps``: infer, run ``n_steps`` actions, infer again."""

    #: How long a stopped loop waits for its run flag before polling again.
    IDLE_POLL_S = 0.05

    def __init__(self, client: PolicyClient, env: PictureEnv, fps: float = 30.0, n_steps: int = 8, max_steps: int = 10_000) -> None:
        self.client, self.env, self.fps, self.n_steps, self.max_steps = client, env, fps, n_steps, max_steps
        self.listeners: list[Any] = []
        self.steps = 0
        self.episode = 0
        #: How often the loop thread, stopped, has polled its run flag (each poll waits ``IDLE_POLL_S``).
        self.idle_polls = 0
        self._progress = threading.Condition()
        self._running = threading.Event()
        self._reset = threading.Event()
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiny-loop", daemon=True)
        self._started = False

    # -- LoopControl ------------------------------------------------------

    def start(self) -> None:
        self._running.set()
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self) -> None:
        self._running.clear()

    def reset_episode(self) -> None:
        self._reset.set()

    def status(self) -> dict[str, Any]:
        return {"running": self._running.is_set(), "episode": self.episode, "steps": self.steps}

    def close(self) -> None:
        self._quit.set()
        self._running.set()
        if self._started:
            self._thread.join(10)

    # -- the loop ---------------------------------------------------------

    def _emit(self, method: str, event: Any) -> None:
        for listener in self.listeners:
            getattr(listener, method)(event)

    def _run(self) -> None:
        obs = self._new_episode()
        chunk_id, step, total_reward = 0, 0, 0.0
        period = 1.0 / self.fps
        while not self._quit.is_set() and self.steps < self.max_steps:
            if not self._running.wait(self.IDLE_POLL_S):
                self._advance("idle_polls")
                continue
            if self._reset.is_set():
                self._reset.clear()
                self._emit("on_episode", EpisodeEvent(self.episode, started=False, steps=step, info={"reason": "operator reset"}))
                self._advance("episode")
                obs, step, total_reward = self._new_episode(), 0, 0.0
            chunk_id += 1
            chunk = self.client.infer({**obs, "step": step})
            roundtrip = chunk.reply["client_timing"]["roundtrip_ms"]
            self._emit("on_chunk", ChunkEvent(self.episode, chunk_id, step, np.asarray(chunk), True, roundtrip_ms=roundtrip, server_timing=chunk.server_timing))
            for action in np.asarray(chunk)[: self.n_steps]:
                if not self._running.is_set() or self._quit.is_set() or self.steps >= self.max_steps:
                    break
                tick = time.monotonic()
                observation = obs  # the executor's convention: step t pairs the observation before action t with it
                obs, done = self.env.step(action)
                reward = float(-np.abs(action).mean())
                total_reward += reward
                success = done and total_reward > -1e9
                latencies = {"roundtrip_ms": roundtrip, **{k: v for k, v in chunk.server_timing.items() if k.endswith("_ms")}}
                self._emit("on_step", StepEvent(self.episode, step, time.time(), observation, action, chunk_id, True, reward, success, done, latencies))
                step += 1
                self._advance("steps")
                if done:
                    self._emit("on_episode", EpisodeEvent(self.episode, started=False, steps=step, success=success, total_reward=total_reward))
                    self._advance("episode")
                    obs, step, total_reward = self._new_episode(), 0, 0.0
                    break
                time.sleep(max(0.0, period - (time.monotonic() - tick)))

    def _new_episode(self) -> dict[str, Any]:
        self.client.reset()
        self._emit("on_episode", EpisodeEvent(self.episode, started=True))
        return self.env.reset()

    def _advance(self, counter: str) -> None:
        """Count one step, episode or idle poll, and wake the tests waiting on the loop's progress."""
        with self._progress:
            setattr(self, counter, getattr(self, counter) + 1)
            self._progress.notify_all()

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Block until ``predicate()`` holds, re-checking it at each step, episode change or idle poll."""
        with self._progress:
            if not self._progress.wait_for(predicate, timeout):
                raise TimeoutError(f"timed out after {timeout} s waiting for {what} (steps {self.steps}, episode {self.episode}, idle polls {self.idle_polls})")

    def wait_steps(self, count: int, timeout: float = 30.0) -> None:
        self.wait_until(lambda: self.steps >= count, f"{count} steps", timeout)

    def wait_idle_polls(self, count: int, timeout: float = 30.0) -> int:
        """Wait until the stopped loop has polled its run flag ``count`` more times; returns the poll counter then."""
        with self._progress:
            target = self.idle_polls + count
        self.wait_until(lambda: self.idle_polls >= target, f"{count} idle polls of the stopped loop", timeout)
        return self.idle_polls
