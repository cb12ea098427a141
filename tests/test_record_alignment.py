"""record -> export -> LeRobotDataset is aligned frame by frame.

A replay episode whose state and camera picture encode the step number runs
in the real :class:`~policylink.runtime.executor.Executor` (simulated time)
against a real server on 127.0.0.1, with the recorder listening. The
exported dataset, read back with LeRobot's own ``LeRobotDataset``, must hold
at frame ``t`` the observation of step ``t`` (frame 0: the reset
observation) and the action the environment was given at step ``t``, for
every recorded step. Recordings that paired each action with the
observation *after* it (format 1) fail this, and are realigned on export.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policylink.client import PolicyClient
from policylink.envs.base import StepResult
from policylink.envs.replay import ReplayEnv
from policylink.media import decode_jpeg
from policylink.policies.builtin import ReplayPolicy
from policylink.record import SessionRecorder, VideoUnavailable, export_lerobot, video_decoder
from policylink.runtime.clock import SteppedClock
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.server.background import BackgroundServer

pytestmark = pytest.mark.lerobot

STEPS = 13  # per episode
EPISODES = 2
CAMERA = (48, 64)
FPS = 30


def step_state(t: int) -> np.ndarray:
    """The state at step ``t``: it says ``t``."""
    return np.array([t, -2.0 * t, 0.5], np.float32)


def step_brightness(t: int) -> int:
    """Every pixel of the camera picture at step ``t`` has this value."""
    return 16 + 12 * t


def step_of_picture(image: np.ndarray) -> int:
    """The step a (decoded, lossy) camera picture shows."""
    return round((float(np.mean(image)) - 16) / 12)


class WitnessedReplay(ReplayEnv):
    """A replay episode that notes, for each step, the action it was given: the truth to check the dataset with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Per episode: the actions applied, in step order (``applied[e][t]`` at step ``t``).
        self.applied: list[list[np.ndarray]] = []

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        self.applied.append([])
        return super().reset(seed)

    def step(self, action: np.ndarray) -> StepResult:
        episode = self.applied[-1]
        assert int(self.state()[0]) == len(episode), "the replay's step and the applied actions disagree"
        episode.append(np.array(action, np.float32))
        return super().step(action)


def write_episode(path: Path) -> Path:
    """A replay episode (.npz) whose state and picture encode the step; its actions are small and all different."""
    states = np.stack([step_state(t) for t in range(STEPS)])
    actions = np.stack([[0.05 * t, -0.03 * t] for t in range(STEPS)]).astype(np.float32)
    frames = np.stack([np.full((*CAMERA, 3), step_brightness(t), np.uint8) for t in range(STEPS)])
    np.savez(path, **{"observation.state": states, "action": actions, "observation.images.front": frames, "fps": np.float64(FPS), "task": "count"})
    return path


def record(root: Path, episode_file: Path, mode: str, latency_steps: int) -> tuple[Path, WitnessedReplay]:
    """Run the real executor over the replay episode ``EPISODES`` times against a real server, recording it."""
    env = WitnessedReplay.from_npz(episode_file)
    assert isinstance(env, WitnessedReplay)
    policy = ReplayPolicy(env.actions, horizon=8, state_dim=3, cameras={"front": CAMERA}, fps=FPS)
    recorder = SessionRecorder(root, {"client": {"fps": FPS, "mode": mode}})
    with BackgroundServer(policy, host="127.0.0.1") as server, PolicyClient(server.url, timeout=10) as client:
        config = ExecutorConfig(mode=mode, fps=FPS, n_action_steps=5)
        executor = Executor(client, env, config, clock=SteppedClock(FPS, latency_steps=latency_steps), listeners=[recorder])
        executor.start(episodes=EPISODES)
        executor.join(60)
        finished = executor.status()["state"] == "finished"
        executor.close()
    recorder.close()
    assert finished, "the loop did not finish its episodes within 60 s"
    assert [len(actions) for actions in env.applied] == [STEPS] * EPISODES
    return recorder.path, env


@pytest.fixture(scope="module")
def episode_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_episode(tmp_path_factory.mktemp("replay") / "counting.npz")


@pytest.fixture(scope="module")
def recorded(episode_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, WitnessedReplay]]:
    yield record(tmp_path_factory.mktemp("sessions"), episode_file, "sync", 0)


def load(root: Path, repo_id: str, **options: Any) -> Any:
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(repo_id, root=root, **options)


def assert_aligned(dataset: Any, env: WitnessedReplay, picture_of: Any) -> None:
    """Frame t of episode e: the observation of step t (frame 0 the reset one) and the action applied at step t; every step there."""
    assert dataset.num_episodes == EPISODES
    assert dataset.num_frames == EPISODES * STEPS == sum(len(actions) for actions in env.applied)
    for index in range(dataset.num_frames):
        item = dataset[index]
        episode, t = divmod(index, STEPS)
        assert (int(item["episode_index"]), int(item["frame_index"])) == (episode, t)
        np.testing.assert_allclose(item["observation.state"].numpy(), step_state(t), atol=1e-6, err_msg=f"state of frame {index}")
        np.testing.assert_allclose(item["action"].numpy(), env.applied[episode][t], atol=1e-5, err_msg=f"action of frame {index}")
        assert picture_of(item) == t, f"frame {index} shows the picture of step {picture_of(item)}, not {t}"
        assert item["task"] == "count"
    # Frame 0 of each episode is the reset observation.
    reset_state = ReplayEnv(env.states, env.actions).reset()["observation.state"]
    for episode in range(EPISODES):
        np.testing.assert_array_equal(dataset[episode * STEPS]["observation.state"].numpy(), reset_state)


def picture(item: dict[str, Any]) -> int:
    return step_of_picture(item["observation.images.front"].numpy() * 255.0)


def test_log_lines_pair_each_action_with_the_observation_it_was_chosen_from(recorded: tuple[Path, WitnessedReplay]) -> None:
    session, env = recorded
    lines = [json.loads(text) for text in (session / "inference_log.jsonl").read_text().splitlines()]
    assert len(lines) == EPISODES * STEPS
    for index, line in enumerate(lines):
        episode, t = divmod(index, STEPS)
        assert (line["episode"], line["step"], line["frame_index"]) == (episode, t, index)
        np.testing.assert_allclose(line["state"], step_state(t), atol=1e-6)
        np.testing.assert_allclose(line["action"], env.applied[episode][t], atol=1e-5)
        assert step_of_picture(decode_jpeg((session / line["images"]["front"]).read_bytes())) == t
        assert line["done"] == (t == STEPS - 1)  # what followed the action: the last one ends the episode


def test_export_is_aligned_frame_by_frame(recorded: tuple[Path, WitnessedReplay], tmp_path: Path) -> None:
    session, env = recorded
    summary = export_lerobot(session, tmp_path / "dataset", repo_id="local/aligned")
    assert (summary.episodes, summary.frames, summary.skipped_steps, summary.missing_steps, summary.realigned) == (EPISODES, EPISODES * STEPS, 0, 0, False)
    assert_aligned(load(tmp_path / "dataset", "local/aligned"), env, picture)


@pytest.mark.parametrize("latency_steps", [2])
def test_export_is_aligned_in_async_mode(episode_file: Path, tmp_path: Path, latency_steps: int) -> None:
    """Asynchronous requests answered ``latency_steps`` ticks later (actions for past steps dropped): still aligned."""
    session, env = record(tmp_path / "sessions", episode_file, "async", latency_steps)
    chunks = [json.loads(text) for text in (session / "chunks.jsonl").read_text().splitlines()]
    assert len(chunks) > EPISODES and any(chunk["obs_step"] > 0 for chunk in chunks)
    export_lerobot(session, tmp_path / "dataset", repo_id="local/async")
    assert_aligned(load(tmp_path / "dataset", "local/async"), env, picture)


def test_export_video_is_aligned(recorded: tuple[Path, WitnessedReplay], tmp_path: Path, capsys: Any) -> None:
    """``export --video``: PyAV encodes the videos; they decode (with the backend that works here) frame by frame."""
    from policylink.cli import main

    session, env = recorded
    backend, note = video_decoder()
    assert main(["export", str(session), str(tmp_path / "video"), "--repo-id", "local/video", "--video"]) == 0
    output = capsys.readouterr().out
    assert f"wrote {EPISODES} episodes, {EPISODES * STEPS} frames at {FPS} fps (front)" in output
    assert "videos encoded with libsvtav1" in output
    info = json.loads((tmp_path / "video" / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.front"]["dtype"] == "video"
    assert list((tmp_path / "video" / "videos").rglob("*.mp4"))
    if backend is None:
        pytest.skip(f"no video decoder works here: {note}")
    if backend != "torchcodec":
        assert f"video_backend={backend!r}" in output  # the load hint names the backend that works here
    assert_aligned(load(tmp_path / "video", "local/video", video_backend=backend), env, picture)


def test_video_refused_with_a_clear_message_without_an_encoder(recorded: tuple[Path, WitnessedReplay], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from policylink.cli import main
    from policylink.record import export as export_module

    session, _ = recorded
    monkeypatch.setattr(export_module, "VIDEO_CODECS", ("no-such-encoder",))
    with pytest.raises(VideoUnavailable, match="has none of the encoders no-such-encoder; export without --video"):
        export_lerobot(session, tmp_path / "refused", video=True)
    assert main(["export", str(session), str(tmp_path / "refused"), "--video"]) == 1
    error = capsys.readouterr().err
    assert "policylink export: error: --video:" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def downgrade_to_format_1(session: Path, target: Path) -> Path:
    """The session as format 1 recorded it: each line an action with the observation after it, steps from 1.

    Line ``t`` of format 1 is (observation of step ``t + 1``, action of step ``t``); the reset
    observation is on no line, and the last action of an episode (whose next observation was
    never recorded by the current format) is left out here.
    """
    shutil.copytree(session, target)
    metadata = json.loads((session / "metadata.json").read_text())
    metadata["format_version"] = 1
    del metadata["step_convention"]
    (target / "metadata.json").write_text(json.dumps(metadata))
    lines = [json.loads(text) for text in (session / "inference_log.jsonl").read_text().splitlines()]
    old = []
    for line, after in zip(lines, lines[1:], strict=False):
        if after["episode"] != line["episode"]:
            continue
        old.append({**line, "step": line["step"] + 1, "state": after["state"], "images": after["images"], "frame_index": after["frame_index"]})
    (target / "inference_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in old))
    return target


def test_format_1_sessions_are_realigned(recorded: tuple[Path, WitnessedReplay], tmp_path: Path, capsys: Any) -> None:
    from policylink.cli import main

    session, env = recorded
    old = downgrade_to_format_1(session, tmp_path / "old-session")
    assert main(["export", str(old), str(tmp_path / "dataset"), "--repo-id", "local/old"]) == 0
    output = capsys.readouterr().out
    assert "realigned each action with the observation it was chosen from" in output
    dataset = load(tmp_path / "dataset", "local/old")
    # Per episode, STEPS - 1 old lines: the first has no recorded observation to pair with, so STEPS - 2 frames.
    assert dataset.num_frames == EPISODES * (STEPS - 2)
    for index in range(dataset.num_frames):
        item = dataset[index]
        episode, frame = divmod(index, STEPS - 2)
        t = frame + 1  # the step whose observation and action this frame holds
        np.testing.assert_allclose(item["observation.state"].numpy(), step_state(t), atol=1e-6)
        np.testing.assert_allclose(item["action"].numpy(), env.applied[episode][t], atol=1e-5)
        assert picture(item) == t
