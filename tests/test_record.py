"""Session recording: the folder's files and schema, a slow disk, and the LeRobot export.

The recorder listens to a small real control loop (tests/watch_loop.py) that
runs against a real server through PolicyClient.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policylink.client import PolicyClient
from policylink.media import decode_jpeg
from policylink.policies.builtin import ReplayPolicy
from policylink.record import SessionError, SessionRecorder, export_lerobot, read_session
from watch_loop import PictureEnv, TinyLoop

CAMERAS = {"front": (48, 64), "wrist": (32, 48)}


def run_session(url: str, recorder: SessionRecorder, steps: int, episode_steps: int = 40) -> TinyLoop:
    """Run a real loop for exactly ``steps`` steps with ``recorder`` listening; then close both."""
    with PolicyClient(url, timeout=10) as client:
        loop = TinyLoop(client, PictureEnv(CAMERAS, episode_steps=episode_steps), fps=200, n_steps=8, max_steps=steps)
        loop.listeners.append(recorder)
        loop.start()
        loop.wait_steps(steps)
        loop.close()
    recorder.close()
    return loop


@pytest.fixture
def server_url(serve: Any) -> str:
    return serve(ReplayPolicy(action_dim=6, horizon=16, cameras=CAMERAS)).url


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_session_folder_files_and_schema(server_url: str, tmp_path: Path) -> None:
    recorder = SessionRecorder(tmp_path, {"policy": {"model_id": "builtin/replay", "fps": 30}, "server": server_url, "client": {"fps": 30, "mode": "sync"}})
    loop = run_session(server_url, recorder, steps=50, episode_steps=30)
    session = recorder.path
    assert session.parent == tmp_path

    metadata = json.loads((session / "metadata.json").read_text())
    assert metadata["policy"]["model_id"] == "builtin/replay"
    assert metadata["server"] == server_url and metadata["client"]["mode"] == "sync"
    assert metadata["versions"]["policylink"] and metadata["versions"]["numpy"] == np.__version__
    assert metadata["start_time"].startswith("20") and metadata["end_time"] >= metadata["start_time"]
    assert metadata["stats"]["steps"] == 50 and metadata["stats"]["frames_dropped"] == 0
    assert [episode["steps"] for episode in metadata["episodes"]] == [30]

    lines = read_lines(session / "inference_log.jsonl")
    assert len(lines) == loop.steps == 50
    first = lines[0]
    assert set(first) >= {"time", "episode", "step", "state", "action", "chunk_id", "fresh", "latencies", "frame_index", "images"}
    assert len(first["state"]) == 6 and len(first["action"]) == 6
    assert first["fresh"] is True and first["chunk_id"] == 1 and first["latencies"]["roundtrip_ms"] > 0
    assert [line["step"] for line in lines[:30]] == list(range(1, 31)) and lines[30]["episode"] == 1
    assert all(later["time"] >= earlier["time"] for earlier, later in zip(lines, lines[1:], strict=False))

    for line in (lines[0], lines[-1]):
        assert set(line["images"]) == set(CAMERAS)
        for camera, relative in line["images"].items():
            assert relative == f"images/frame_{line['frame_index']:06d}/{camera}.jpg"
            assert decode_jpeg((session / relative).read_bytes()).shape == (*CAMERAS[camera], 3)
    assert len(list((session / "images").iterdir())) == 50

    chunks = read_lines(session / "chunks.jsonl")
    assert chunks[0]["chunk_id"] == 1 and np.array(chunks[0]["actions"]).shape == (16, 6)
    # The executed action is the first action of the chunk computed for step 0.
    np.testing.assert_allclose(first["action"], chunks[0]["actions"][0], atol=1e-5)


class StalledDisk:
    """A file writer that blocks until released: a disk that cannot keep up."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.written: list[Path] = []

    def __call__(self, path: Path, data: bytes) -> None:
        self.released.wait(30)
        path.write_bytes(data)
        self.written.append(path)


def record_on_stalled_disk(url: str, root: Path, disk: StalledDisk, steps: int = 60) -> tuple[SessionRecorder, TinyLoop]:
    recorder = SessionRecorder(root, {"client": {"fps": 30}}, max_queued_frames=4, file_writer=disk)
    with PolicyClient(url, timeout=10) as client:
        loop = TinyLoop(client, PictureEnv(CAMERAS), fps=200, n_steps=8, max_steps=steps)
        loop.listeners.append(recorder)
        loop.start()
        loop.wait_steps(steps)  # would time out if the loop waited for the disk
        loop.close()
    return recorder, loop


def test_slow_disk_drops_frames_not_steps(server_url: str, tmp_path: Path) -> None:
    """A writer that blocks (a stalled disk) fills the frame queue; the loop runs on."""
    disk = StalledDisk()
    recorder, loop = record_on_stalled_disk(server_url, tmp_path, disk)
    assert loop.steps == 60
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
    run_session(server_url, recorder, steps=45, episode_steps=20)  # episodes of 20, 20, 5 steps
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
        assert tuple(item["observation.images.front"].shape) == (3, 48, 64)
        assert item["task"] == "watch the bar"
    assert int(dataset[21]["episode_index"]) == 1 and int(dataset[21]["frame_index"]) == 1

    with pytest.raises(FileExistsError, match="already exists"):
        export_lerobot(recorder.path, tmp_path / "dataset")


@pytest.mark.lerobot
def test_export_command(server_url: str, tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from policylink.cli import main

    recorder = SessionRecorder(tmp_path / "sessions", {"client": {"fps": 15}})
    run_session(server_url, recorder, steps=12)
    assert main(["export", str(recorder.path), str(tmp_path / "out"), "--repo-id", "local/cli"]) == 0
    output = capsys.readouterr().out
    assert "wrote 1 episodes, 12 frames at 15 fps (front, wrist)" in output
    assert LeRobotDataset("local/cli", root=tmp_path / "out").num_frames == 12
    # A folder that is not a session: a one-line error naming the problem.
    assert main(["export", str(tmp_path), str(tmp_path / "out2")]) == 1
    assert "is not a policylink session: no metadata.json" in capsys.readouterr().err


@pytest.mark.lerobot
def test_export_fills_dropped_frames(server_url: str, tmp_path: Path) -> None:
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    disk = StalledDisk()
    recorder, _ = record_on_stalled_disk(server_url, tmp_path / "sessions", disk, steps=30)
    disk.released.set()
    recorder.close()
    summary = export_lerobot(recorder.path, tmp_path / "dataset", repo_id="local/dropped")
    # 5 steps kept their frames; the 25 others reuse the previous saved frame, per camera.
    assert (summary.frames, summary.filled_frames) == (30, 25 * len(CAMERAS))
    dataset = LeRobotDataset("local/dropped", root=tmp_path / "dataset")
    assert dataset.num_frames == 30
    assert tuple(dataset[29]["observation.images.wrist"].shape) == (3, 32, 48)
