"""A replayed episode on the monitor: the recorded action next to the served one.

A real recorded episode (an ``.npz`` the replay environment loads) is driven
by the real executor against a real server whose built-in replay policy
serves the recorded actions plus 0.25 (the executor's held and dropped
actions add to the difference). The monitor, wired by the CLI's
``Watchers`` exactly as ``policylink run`` wires it, gets the recorded action
of every step from the environment and shows it in the action plot, and the
running mean |served - recorded| in the status, in headless Chromium; its
numbers agree with the environment's own ``report()``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import free_port
from policylink.cli._watch import Watchers, add_watch_flags
from policylink.client import PolicyClient
from policylink.envs.replay import ReplayEnv
from policylink.policies.builtin import ReplayPolicy, sine_trajectory
from policylink.runtime.executor import Executor, ExecutorConfig
from watch_loop import CHROMEDRIVER, CHROMIUM, chromium, wait_for

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
OFFSET = 0.25


def write_episode(path: Path, steps: int) -> np.ndarray:
    """A recorded episode: a smooth 6-d trajectory, its states, and a front camera; returns the recorded actions."""
    actions = sine_trajectory(steps, 6)
    frames = np.zeros((steps, 48, 64, 3), np.uint8)
    for t in range(steps):
        frames[t, :, (t * 3) % 60 : (t * 3) % 60 + 4] = (255, 200, 0)
    np.savez(path, **{"observation.state": np.roll(actions, 1, axis=0), "action": actions, "observation.images.front": frames, "fps": 30.0})
    return actions


def watch_args(port: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_watch_flags(parser)
    return parser.parse_args(["--monitor", str(port)])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def updates(url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The monitor's server-sent events, as it sends them."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=10)
    try:
        conn.request("GET", "/events")
        response = conn.getresponse()
        name = ""
        while True:
            line = response.readline().decode()
            if not line:
                return
            if line.startswith("event: "):
                name = line[7:].strip()
            elif line.startswith("data: "):
                yield name, json.loads(line[6:])
    finally:
        conn.close()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (make test installs them)")
def test_replay_recorded_and_served_actions_on_the_page(serve: Any, tmp_path: Path) -> None:
    recorded = write_episode(tmp_path / "episode.npz", steps=240)
    server = serve(ReplayPolicy(actions=recorded + OFFSET, horizon=16, cameras={"front": (48, 64)}))
    env = ReplayEnv.load(tmp_path / "episode.npz")
    with Watchers(watch_args(free_port()), metadata={"server": server.url, "env": "replay"}, fps=30) as watchers, PolicyClient(server.url) as client:
        executor = Executor(client, env, ExecutorConfig(mode="sync", fps=30))
        for listener in watchers.listeners:
            executor.add_listener(listener)
        watchers.attach(executor)  # as policylink run does: the monitor finds the replay in executor.env
        monitor = watchers.monitor
        assert monitor is not None and monitor.replay is env and monitor.config["replay"] is True
        with chromium() as driver:
            driver.get(monitor.url)
            page = lambda script: driver.execute_script(f"return {script};")  # noqa: E731
            wait_for(lambda: page("window.monitor.config.replay") is True, "the page's hello")
            executor.start(episodes=1)
            wait_for(lambda: page("window.monitor.samples.filter((s) => s.recorded).length") >= 30, "recorded actions in the page")
            # The status shows the running mean |served - recorded|; the action plot says what the dotted lines are.
            assert page("document.getElementById('replay-stat').hidden") is False
            text = wait_for(lambda: page("document.getElementById('replay-error').textContent").replace("–", ""), "the replay error in the status")
            assert float(text.split()[0]) > 0
            assert "recorded (dotted)" in page("document.getElementById('action-title').textContent")
            samples = page("window.monitor.samples.filter((s) => s.recorded)")
            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "monitor-replay.png"))
            executor.join(60)
            assert executor.status()["state"] == "finished"
        executor.close()

        # Every recorded action the page got is a row of the recording, next to the served action it was compared with.
        rows = {tuple(row) for row in np.round(recorded.astype(np.float64), 5).tolist()}
        assert all(tuple(sample["recorded"]) in rows for sample in samples)
        pairs = np.array([[sample["action"], sample["recorded"]] for sample in samples])
        assert np.abs(pairs[:, 0] - pairs[:, 1]).mean() >= OFFSET - 0.01  # the server adds 0.25 to the recording
        # The monitor's running comparison is the environment's own report of the episode.
        report = env.report()
        shown = monitor.state.status()["replay"]
        assert shown["steps"] == report["steps"] == 240
        assert shown["mean_abs_error"] == pytest.approx(report["mean_abs_error"], abs=1e-5)
        assert shown["max_abs_error"] == pytest.approx(report["max_abs_error"], abs=1e-5)


def test_policylink_run_replay_shows_recorded_actions(tmp_path: Path, capsys: Any) -> None:
    """``policylink run --env replay --monitor``: the monitor finds the replay without a hook in run.py."""
    from policylink.cli import main

    recorded = write_episode(tmp_path / "episode.npz", steps=150)
    np.save(tmp_path / "served.npy", recorded + OFFSET)
    port = free_port()
    argv = ["run", "--env", "replay", "--env.path", str(tmp_path / "episode.npz"), "--policy.type", "replay", "--policy.actions", str(tmp_path / "served.npy"),
            "--mode", "sync", "--episodes", "1", "--monitor", str(port)]
    exit_codes: list[int] = []
    run = threading.Thread(target=lambda: exit_codes.append(main(argv)), daemon=True)
    run.start()
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: answers(url + "api/status") or not run.is_alive(), "the monitor to answer", timeout=30)
    compared: dict[str, Any] = {}
    seen: list[dict[str, Any]] = []  # every step with its recorded action, from the episode's start
    stream = updates(url)
    try:
        name, hello = next(stream)
        assert name == "hello" and hello["replay"] is True and hello["controls"] is True
        # Timed by the monitor's own updates (10 a second): at most 10 s of them.
        for count, (name, update) in enumerate(stream):
            seen += [sample for sample in update["samples"] if "recorded" in sample]
            if update["status"].get("replay", {}).get("steps", 0) >= 10:
                compared = update["status"]["replay"]
                break
            assert count < 100, "no recorded action in 10 s of updates"
    finally:
        stream.close()
    run.join(60)
    assert not run.is_alive() and exit_codes == [0]
    # The update's running mean is the mean over the steps it sent, each a served action and a recorded row.
    rows = {tuple(row) for row in np.round(recorded.astype(np.float64), 5).tolist()}
    assert compared["steps"] == len(seen) and all(tuple(sample["recorded"]) in rows for sample in seen)
    pairs = np.array([[sample["action"], sample["recorded"]] for sample in seen])
    assert compared["mean_abs_error"] == pytest.approx(np.abs(pairs[:, 0] - pairs[:, 1]).mean(), abs=1e-4)
    assert compared["mean_abs_error"] >= OFFSET - 0.01 and compared["max_abs_error"] >= compared["mean_abs_error"]
    assert "mean |served - recorded|" in capsys.readouterr().out
