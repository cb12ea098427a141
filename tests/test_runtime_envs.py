"""The fake and replay environments, alone and driven by the executor over a real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from policylink.client import PolicyClient
from policylink.envs.fake import FakeEnv
from policylink.envs.replay import ReplayEnv
from policylink.policies.builtin import ReplayPolicy, sine_trajectory
from policylink.runtime.clock import SteppedClock
from policylink.runtime.executor import Executor, ExecutorConfig


@pytest.mark.parametrize(
    ("layout", "cameras", "size", "dim"),
    [("single", None, (480, 640), 6), ("bimanual", ["top", "left_wrist", "right_wrist"], (48, 64), 12), ("single", [], (480, 640), 6)],
)
def test_fake_layouts_have_lerobot_keys_and_shapes(layout, cameras, size, dim):
    env = FakeEnv(layout, cameras=cameras, image_size=size)
    obs = env.reset(seed=3)
    assert obs["observation.state"].shape == (dim,) and obs["observation.state"].dtype == np.float32
    image_keys = sorted(key for key in obs if key.startswith("observation.images."))
    assert image_keys == sorted(f"observation.images.{name}" for name in env.camera_names)
    for key in image_keys:
        assert obs[key].shape == (*size, 3) and obs[key].dtype == np.uint8
    assert env.action_dim == dim


def test_fake_is_seeded_and_follows_commands():
    def rollout(seed: int) -> list[np.ndarray]:
        env = FakeEnv("single", image_size=(24, 32), episode_steps=5)
        observations = [env.reset(seed)]
        for _ in range(5):
            result = env.step(np.ones(6, np.float32))
            observations.append(result.observation)
        assert result.truncated
        return observations

    first, again, other = rollout(1), rollout(1), rollout(2)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["observation.state"], other[0]["observation.state"])
    assert np.all(first[-1]["observation.state"] > first[0]["observation.state"])  # moving toward the command
    assert not np.array_equal(first[0]["observation.images.front"], first[-1]["observation.images.front"])


def test_fake_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown fake layout 'triple'"):
        FakeEnv("triple")
    with pytest.raises(ValueError, match="0 to 3 distinct cameras"):
        FakeEnv(cameras=["a", "b", "c", "d"])
    env = FakeEnv(image_size=(8, 8))
    env.reset()
    with pytest.raises(ValueError, match="takes 6 values per action, got shape"):
        env.step(np.zeros(12))


def test_replay_npz_reports_action_error(tmp_path: Path):
    steps = 10
    actions = sine_trajectory(steps, 6)
    frames = np.random.default_rng(0).integers(0, 255, (steps, 24, 32, 3), dtype=np.uint8)
    path = tmp_path / "episode.npz"
    np.savez(path, **{"observation.state": actions * 0.5, "action": actions, "observation.images.front": frames})
    env = ReplayEnv.load(path)
    obs = env.reset()
    np.testing.assert_array_equal(obs["observation.images.front"], frames[0])
    for t in range(steps):
        result = env.step(actions[t] + (0.1 if t == 4 else 0.0))
        assert result.observation["observation.state"] == pytest.approx(actions[min(t + 1, steps - 1)] * 0.5)
    assert result.truncated
    report = result.info["action_error"]
    assert report["steps"] == steps
    assert report["max_abs_error"] == pytest.approx(0.1, abs=1e-6)
    assert report["mean_abs_error"] == pytest.approx(0.1 / steps, abs=1e-6)
    with pytest.raises(ValueError, match="no 'action' / 'actions' array"):
        np.savez(tmp_path / "bad.npz", state=actions)
        ReplayEnv.load(tmp_path / "bad.npz")


@pytest.mark.parametrize(("compensate", "exact"), [(True, True), (False, False)])
def test_replay_scores_the_served_actions(serve, tmp_path: Path, compensate: bool, exact: bool):
    steps = 40
    trajectory = sine_trajectory(steps, 6)
    np.savez(tmp_path / "episode.npz", state=trajectory, action=trajectory)
    server = serve(ReplayPolicy(actions=trajectory, horizon=16))
    env = ReplayEnv.load(tmp_path / "episode.npz")
    with PolicyClient(server.url) as client:
        executor = Executor(client, env, ExecutorConfig(mode="async", n_action_steps=12, compensate=compensate), clock=SteppedClock(30, 3))
        executor.run(episodes=1)
        executor.close()
    report = executor.episode_results[0]["info"]["action_error"]
    assert report["steps"] == steps
    if exact:
        assert report["max_abs_error"] == pytest.approx(0.0, abs=1e-6)  # compensation: every action on its step
    else:
        assert report["max_abs_error"] > 1e-3  # late actions executed from their start: off by the latency


@pytest.mark.lerobot
def test_replay_from_a_lerobot_dataset(serve, tmp_path: Path):
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    steps, rng = 12, np.random.default_rng(0)
    actions = sine_trajectory(steps, 6)
    frames = rng.integers(0, 255, (steps, 24, 32, 3), dtype=np.uint8)
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
        "observation.images.front": {"dtype": "image", "shape": (24, 32, 3), "names": ["height", "width", "channels"]},
    }
    root = tmp_path / "dataset"
    dataset = LeRobotDataset.create("local/replay", fps=30, features=features, root=root, use_videos=False)
    for episode in range(2):
        for t in range(steps):
            dataset.add_frame({"observation.state": actions[t] + episode, "action": actions[t] + episode, "observation.images.front": frames[t], "task": "stack"})
        dataset.save_episode()
    dataset.finalize()

    env = ReplayEnv.load(root, episode=1)
    assert len(env) == steps and env.camera_names == ("front",) and env.task == "stack"
    np.testing.assert_allclose(env.actions, actions + 1, atol=1e-6)
    np.testing.assert_array_equal(env.reset()["observation.images.front"], frames[0])

    server = serve(ReplayPolicy(actions=actions + 1, horizon=8))
    with PolicyClient(server.url) as client:
        executor = Executor(client, env, ExecutorConfig(mode="async", n_action_steps=8), clock=SteppedClock(30, 2))
        executor.run(episodes=1)
        executor.close()
    assert executor.episode_results[0]["info"]["action_error"]["max_abs_error"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="episode 5 does not exist"):
        ReplayEnv.load(root, episode=5)
