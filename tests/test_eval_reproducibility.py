"""Seeds make an evaluation reproducible, and running environments in parallel changes nothing.

The policy is a real LeRobot ACT with random weights, shaped for PushT's
key-point observations (``observation.state`` 2-d, ``observation.environment_state``
16-d) and served by a real local server; ACT is deterministic at inference,
so an episode's outcome depends on its seed alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gym_pusht")

from lerobot_checkpoints import save_checkpoint  # noqa: E402  (skips without lerobot)

import torch  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.act.configuration_act import ACTConfig  # noqa: E402

from policylink.evaluation import EvalConfig, evaluate  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402

pytestmark = pytest.mark.lerobot

EPISODES = 4
STEPS = 24


@pytest.fixture(scope="module")
def pusht_act_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ACTConfig(
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (2,)),
            "observation.environment_state": PolicyFeature(FeatureType.ENV, (16,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        device="cpu", chunk_size=8, n_action_steps=8,
        dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
        n_vae_encoder_layers=1, latent_dim=8, pretrained_backbone_weights=None,
    )

    def moments(shape: tuple[int, ...], spread: float) -> dict[str, torch.Tensor]:
        mean, std = torch.full(shape, 256.0), torch.full(shape, spread)
        return {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std}

    # A wide action spread: the random policy sweeps the table and meets the block.
    stats = {"observation.state": moments((2,), 100.0), "observation.environment_state": moments((16,), 100.0), "action": moments((2,), 150.0)}
    return save_checkpoint(config, tmp_path_factory.mktemp("checkpoints") / "pusht_act", stats, seed=3)


@pytest.fixture
def server(serve):
    from policylink.backends.lerobot import load_from_request

    return serve(Engine(None, loader=load_from_request))


def outcomes(url: str, checkpoint: Path, seed: int, num_envs: int) -> list[tuple]:
    config = EvalConfig(
        env="pusht", env_options={"obs_type": "environment_state_agent_pos"}, episodes=EPISODES, num_envs=num_envs,
        seed=seed, max_steps=STEPS, policy_path=str(checkpoint),
    )
    report = evaluate(url, config)
    return [(e.seed, e.success, e.length, e.total_reward, e.requests) for e in report.episodes]


def same(run: list[tuple], reference: list[tuple]) -> bool:
    """Equal, returns up to float rounding: the server may batch parallel sessions' requests,
    and a batch of 3 is not summed bit for bit like a batch of 1."""
    return [r[:3] + r[4:] for r in run] == [r[:3] + r[4:] for r in reference] and all(
        a[3] == pytest.approx(b[3], rel=1e-9, abs=1e-9) for a, b in zip(run, reference, strict=True)
    )


def test_same_seeds_same_results_serial_or_parallel(server, pusht_act_dir):
    serial = outcomes(server.url, pusht_act_dir, seed=10, num_envs=1)
    assert [seed for seed, *_ in serial] == [10, 11, 12, 13]
    assert outcomes(server.url, pusht_act_dir, seed=10, num_envs=1) == serial
    assert same(outcomes(server.url, pusht_act_dir, seed=10, num_envs=3), serial)
    # The seeds matter: different start states give different returns.
    assert len({reward for *_, reward, _ in serial}) > 1
    other_seeds = outcomes(server.url, pusht_act_dir, seed=20, num_envs=1)
    assert [reward for *_, reward, _ in other_seeds] != [reward for *_, reward, _ in serial]
