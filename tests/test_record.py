"""Session recording: the folder's files and schema, a slow disk, and the LeRobot export.

The recorder listens to the real control loop (:class:`policylink.runtime.Executor`,
in simulated time) that runs against a real server through PolicyClient.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policylink.client import PolicyClient
from policylink.envs.base import Env, StepResult
from policylink.media import decode_jpeg
from policylink.policies.builtin import ReplayPolicy
from policylink.record import SessionError, SessionRecorder, export_lerobot, read_session
from policylink.runtime.clock import SteppedClock
from policylink.runtime.events import StepEvent
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.types import Observation
from watch_loop import bar_frame

CAMERAS = {"front": (48, 64), "wrist": (32, 48)}


class PictureArm(Env):
    """An arm whose state follows the actions, seen by cameras showing a moving bar; episodes of the given lengths."""

    name = "picture-arm"
    action_dim = 6

    def __init__(self, cameras: dict[str, tuple[int, int]], episode_lengths: Sequence[int]) -> None:
        self.cameras = cameras
        self.episode_lengths = list(episode_lengths)
        self.episodes = -1
        self.t = 0
        self.arm = np.zeros(self.action_dim, np.float32)
        #: Every action the loop applied, in order: the truth the recording is checked against.
        self.applied: list[np.ndarray] = []

    def reset(self, seed: int | None = None) -> Observation:
        self.episodes += 1
        self.t = 0
        self.arm[:] = 0
        return self.observation()

    def step(self, action: np.ndarray) -> StepResult:
        self.applied.append(np.array(action, np.float32))
        self.arm = 0.5 * self.arm + 0.5 * np.asarray(action, np.float32)
        self.t += 1
        length = self.episode_lengths[self.episodes % len(self.episode_lengths)]
        return StepResult(self.observation(), reward=float(-np.abs(action).mean()), truncated=self.t >= length)

    def observation(self) -> Observation:
        obs: Observation = {"observation.state": self.arm.copy(), "task": "watch the bar"}
        for index, (name, size) in enumerate(self.cameras.items()):
            obs[f"observation.images.{name}"] = bar_frame(self.t, index, size)
        return obs


def run_loop(url: str, listeners: Sequence[Any], episode_lengths: Sequence[int], timeout: float = 60.0) -> Executor:
    """Run the real executor (sync chunks of 8, simulated time) over episodes of ``episode_lengths`` with ``listeners``.

    Fails if the loop has not finished within ``timeout`` seconds (a listener that made it wait).
    """
    with PolicyClient(url, timeout=10) as client:
        config = ExecutorConfig(mode="sync", fps=30, n_action_steps=8)
        executor = Executor(client, PictureArm(CAMERAS, episode_lengths), config, clock=SteppedClock(30), listeners=listeners)
        executor.start(episodes=len(episode_lengths))
        executor.join(timeout)
        finished = executor.status()["state"] == "finished"
        executor.close()
    assert finished, f"the loop did not finish its episodes within {timeout} s"
    return executor


def run_session(url: str, recorder: SessionRecorder, episode_lengths: Sequence[int]) -> Executor:
    """Run the real loop with ``recorder`` listening; then close the recorder."""
    executor = run_loop(url, [recorder], episode_lengths)
    recorder.close()
    return executor


@pytest.fixture
def server_url(serve: Any) -> str:
    return serve(ReplayPolicy(action_dim=6, horizon=16, cameras=CAMERAS)).url


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_session_folder_files_and_schema(server_url: str, tmp_path: Path) -> None:
    recorder = SessionRecorder(tmp_path, {"policy": {"model_id": "builtin/replay", "fps": 30}, "server": server_url, "client": {"fps": 30, "mode": "sync"}})
    executor = run_session(server_url, recorder, [30, 20])
    session = recorder.path
    assert session.parent == tmp_path

    metadata = json.loads((session / "metadata.json").read_text())
    assert metadata["policy"]["model_id"] == "builtin/replay"
    assert metadata["server"] == server_url and metadata["client"]["mode"] == "sync"
    assert metadata["versions"]["policylink"] and metadata["versions"]["numpy"] == np.__version__
    assert metadata["start_time"].startswith("20") and metadata["end_time"] >= metadata["start_time"]
    assert metadata["stats"]["steps"] == 50 and metadata["stats"]["frames_dropped"] == 0
    assert metadata["format_version"] == 2 and metadata["step_convention"] == "observation_before_action"
    assert metadata["stats"]["step_lines_dropped"] == 0 and metadata["stats"]["chunk_lines_dropped"] == 0
    assert [episode["steps"] for episode in metadata["episodes"]] == [30, 20]

    lines = read_lines(session / "inference_log.jsonl")
    assert len(lines) == recorder.stats.steps == 50
    first = lines[0]
    assert set(first) >= {"time", "episode", "step", "state", "action", "chunk_id", "fresh", "latencies", "frame_index", "images"}
    assert len(first["state"]) == 6 and len(first["action"]) == 6
    assert first["fresh"] is True and first["chunk_id"] == 1 and first["latencies"]["roundtrip_ms"] > 0
    # Steps count from 0 in each episode; step 0 holds the reset observation (the arm at rest, the bar at column 0).
    assert [line["step"] for line in lines] == list(range(30)) + list(range(20))
    assert [line["episode"] for line in lines] == [0] * 30 + [1] * 20
    assert first["state"] == [0.0] * 6 and lines[30]["state"] == [0.0] * 6
    # What followed each action: the episode ends on its last step's line, not one later.
    assert [line["done"] for line in lines].count(True) == 2 and lines[29]["done"] and lines[49]["done"]
    # The state at step t+1 is where the action at step t took the arm (0.5 * state + 0.5 * action).
    for earlier, later in zip(lines[:29], lines[1:30], strict=True):
        np.testing.assert_allclose(later["state"], 0.5 * np.array(earlier["state"]) + 0.5 * np.array(earlier["action"]), atol=1e-5)
    assert all(later["time"] >= earlier["time"] for earlier, later in zip(lines, lines[1:], strict=False))

    assert [line["frame_index"] for line in lines] == list(range(50))
    reset_frame = decode_jpeg((session / first["images"]["front"]).read_bytes())
    assert reset_frame[:, :4].mean() > 120 and reset_frame[:, 20:].mean() < 60  # the bar at column 0: the reset picture
    for line in (lines[0], lines[-1]):
        assert set(line["images"]) == set(CAMERAS)
        for camera, relative in line["images"].items():
            assert relative == f"images/frame_{line['frame_index']:06d}/{camera}.jpg"
            assert decode_jpeg((session / relative).read_bytes()).shape == (*CAMERAS[camera], 3)
    assert len(list((session / "images").iterdir())) == 50

    # Each line's action is the one the environment was given at that step.
    applied = executor.env.applied  # type: ignore[attr-defined]
    assert len(applied) == 50
    np.testing.assert_allclose([line["action"] for line in lines], applied, atol=1e-5)

    chunks = read_lines(session / "chunks.jsonl")
    assert chunks[0]["chunk_id"] == 1 and chunks[0]["obs_step"] == 0 and np.array(chunks[0]["actions"]).shape == (16, 6)
    assert chunks[1]["obs_step"] == 8  # sync chunks of 8: the second is asked for at step 8, from its observation


class StalledDisk:
    """A file writer that blocks until released: a disk that cannot keep up. ``entered``: a write has begun."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.written: list[Path] = []

    def __call__(self, path: Path, data: bytes) -> None:
        self.entered.set()
        self.released.wait(30)
        path.write_bytes(data)
        self.written.append(path)


class AfterFirstStep:
    """A listener that holds the loop at its first step until the disk is writing (then never again)."""

    def __init__(self, disk: StalledDisk) -> None:
        self.disk = disk

    def on_step(self, event: StepEvent) -> None:
        if event.episode == 0 and event.step == 0:
            assert self.disk.entered.wait(10), "the recorder never started writing the first frame"


def record_on_stalled_disk(url: str, root: Path, disk: StalledDisk, episode_lengths: Sequence[int]) -> SessionRecorder:
    recorder = SessionRecorder(root, {"client": {"fps": 30}}, max_queued_frames=4, file_writer=disk)
    # Once the first frame is in the (stalled) writer, the loop must finish without waiting for the disk.
    run_loop(url, [recorder, AfterFirstStep(disk)], episode_lengths, timeout=20)
    return recorder


def test_slow_disk_drops_frames_not_steps(server_url: str, tmp_path: Path) -> None:
    """A writer that blocks (a stalled disk) fills the frame queue; the loop runs on."""
    disk = StalledDisk()
    recorder = record_on_stalled_disk(server_url, tmp_path, disk, [40, 20])
    assert recorder.stats.steps == 60
    # One frame is being written, four wait in the queue, the rest are dropped.
    assert recorder.stats.frames_dropped == 60 - 5
    disk.released.set()
    recorder.close()
    assert recorder.stats.frames_written == 5 * len(CAMERAS) == len(disk.written)

    lines = read_lines(recorder.path / "inference_log.jsonl")
    assert len(lines) == 60  # every step is logged, with or without its frame
    dropped = [line for line in lines if line.get("frame_dropped")]
    assert len(dropped) == 55 and all(line["images"] == {} for line in dropped)
    assert json.loads((recorder.path / "metadata.json").read_text())["stats"]["frames_dropped"] == 55


def test_recorder_without_images_and_bad_session(tmp_path: Path) -> None:
    recorder = SessionRecorder(tmp_path, images=False, name="plain")
    recorder.close()
    assert (tmp_path / "plain" / "metadata.json").is_file()
    with pytest.raises(FileExistsError):
        SessionRecorder(tmp_path, name="plain")
    with pytest.raises(SessionError, match="no inference_log.jsonl"):
        read_session(tmp_path / "plain")
    with pytest.raises(SessionError, match="not a policylink session"):
        read_session(tmp_path)


@pytest.mark.lerobot
def test_export_round_trip_through_lerobot_reader(server_url: str, tmp_path: Path) -> None:
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    recorder = SessionRecorder(tmp_path / "sessions", {"client": {"fps": 30, "task": "watch the bar"}})
    run_session(server_url, recorder, [20, 20, 5])
    summary = export_lerobot(recorder.path, tmp_path / "dataset", repo_id="local/watch")
    assert (summary.episodes, summary.frames, summary.fps) == (3, 45, 30)

    dataset = LeRobotDataset("local/watch", root=tmp_path / "dataset")
    assert dataset.num_episodes == 3 and dataset.num_frames == 45 and dataset.fps == 30
    assert set(dataset.meta.camera_keys) == {"observation.images.front", "observation.images.wrist"}
    lines = read_lines(recorder.path / "inference_log.jsonl")
    for index in (0, 21, 44):
        item = dataset[index]
        np.testing.assert_allclose(item["action"].numpy(), lines[index]["action"], atol=1e-5)
        np.testing.assert_allclose(item["observation.state"].numpy(), lines[index]["state"], atol=1e-5)
        assert int(item["frame_index"]) == lines[index]["step"]
        assert tuple(item["observation.images.front"].shape) == (3, 48, 64)
        assert item["task"] == "watch the bar"
    assert int(dataset[21]["episode_index"]) == 1 and int(dataset[21]["frame_index"]) == 1
    # Each episode's frame 0 is its reset observation: the arm at rest.
    assert not dataset[0]["observation.state"].any() and not dataset[20]["observation.state"].any()

    with pytest.raises(FileExistsError, match="already exists"):
        export_lerobot(recorder.path, tmp_path / "dataset")


@pytest.mark.lerobot
def test_export_command(server_url: str, tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from policylink.cli import main

    recorder = SessionRecorder(tmp_path / "sessions", {"client": {"fps": 15}})
    run_session(server_url, recorder, [12])
    assert main(["export", str(recorder.path), str(tmp_path / "out"), "--repo-id", "local/cli"]) == 0
    output = capsys.readouterr().out
    assert "wrote 1 episodes, 12 frames at 15 fps (front, wrist)" in output
    assert "realigned" not in output and "dropped" not in output
    assert LeRobotDataset("local/cli", root=tmp_path / "out").num_frames == 12
    # A folder that is not a session: a one-line error naming the problem.
    assert main(["export", str(tmp_path), str(tmp_path / "out2")]) == 1
    assert "is not a policylink session: no metadata.json" in capsys.readouterr().err


@pytest.mark.lerobot
def test_export_fills_dropped_frames(server_url: str, tmp_path: Path) -> None:
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    disk = StalledDisk()
    recorder = record_on_stalled_disk(server_url, tmp_path / "sessions", disk, [30])
    disk.released.set()
    recorder.close()
    summary = export_lerobot(recorder.path, tmp_path / "dataset", repo_id="local/dropped")
    # 5 steps kept their frames; the 25 others reuse the previous saved frame, per camera.
    assert (summary.frames, summary.filled_frames) == (30, 25 * len(CAMERAS))
    dataset = LeRobotDataset("local/dropped", root=tmp_path / "dataset")
    assert dataset.num_frames == 30
    assert tuple(dataset[29]["observation.images.wrist"].shape) == (3, 32, 48)
