"""``policylink eval --env metaworld/<task>`` on real MetaWorld episodes, against real local servers.

MetaWorld's own scripted experts (``metaworld.policies``) drive the adapter
directly to record a successful trajectory; a built-in ``replay`` policy then
serves those actions through a local server, as a trained policy's chunks
would come. Success is MetaWorld's ``info["success"]``: the replay reaches
it, standing still does not. Built-in policies only (no torch needed); small
camera frames keep the episodes fast, except in the command-line runs, which
keep the default 480x480 and a few steps.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

import policylink.envs.sim  # noqa: F401  (sets MUJOCO_GL before MuJoCo is imported)

pytest.importorskip("metaworld")

from metaworld import policies as experts  # noqa: E402

from policylink.cli import main  # noqa: E402
from policylink.envs.sim import make_sim_env  # noqa: E402
from policylink.envs.sim.metaworld import MetaWorldEnv, metaworld_tasks  # noqa: E402
from policylink.evaluation import EvalConfig, evaluate  # noqa: E402
from policylink.policies.builtin import ReplayPolicy, make_builtin_policy  # noqa: E402

# MetaWorld's experts warn that their gains may ask for more than the [-1, 1] the environment clips to.
pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")

SEED = 1
SMALL = {"image_size": (32, 32)}
EXPERTS = {"reach-v3": experts.SawyerReachV3Policy, "pick-place-v3": experts.SawyerPickPlaceV3Policy}


@functools.cache
def expert_run(task: str, seed: int = SEED, limit: int = 200) -> np.ndarray:
    """The scripted expert's actions (clipped to the action space) from ``seed`` up to its success step.

    Checks on the way that success is exactly MetaWorld's ``info["success"]``
    and that it ends the episode.
    """
    expert = EXPERTS[task]()
    env = MetaWorldEnv(task, **SMALL)
    actions = []
    try:
        obs = env.reset(seed=seed)
        for _ in range(limit):
            actions.append(np.clip(expert.get_action(obs["observation.environment_state"]), -1.0, 1.0).astype(np.float32))
            step = env.step(actions[-1])
            assert step.success == (step.info["success"] == 1.0)
            assert step.terminated == step.success and not step.truncated
            if step.success:
                break
            obs = step.observation
    finally:
        env.close()
    assert step.success, f"MetaWorld's {task} expert should succeed within {limit} steps"
    return np.array(actions)


@pytest.fixture(scope="module", params=sorted(EXPERTS))
def expert(request) -> tuple[str, np.ndarray]:
    return request.param, expert_run(request.param)


@pytest.fixture(scope="module")
def reach() -> np.ndarray:
    return expert_run("reach-v3")


def replay(actions: np.ndarray) -> ReplayPolicy:
    """The recorded actions, then the last one held (a replay runs past the success step)."""
    return ReplayPolicy(actions=np.concatenate([actions, np.repeat(actions[-1:], 64, axis=0)]), horizon=8)


def metaworld_config(task: str = "reach-v3", **options) -> EvalConfig:
    return EvalConfig(env=f"metaworld/{task}", env_options=dict(SMALL), **options)


def test_observation_and_action_layout():
    env = make_sim_env("metaworld/pick-place-v3", image_size=(24, 40), camera="topview")
    try:
        obs = env.reset(seed=SEED)
        assert {key: (value.shape, value.dtype) for key, value in obs.items()} == {
            "observation.state": ((4,), np.float32),
            "observation.environment_state": ((39,), np.float32),
            "observation.images.topview": ((24, 40, 3), np.uint8),
        }
        np.testing.assert_array_equal(obs["observation.state"], obs["observation.environment_state"][:4])
        assert env.name == "metaworld/pick-place-v3" and env.camera_names == ("topview",)
        assert env.action_dim == 4 and env.max_episode_steps == 500
        assert env.fps == pytest.approx(1.0 / env._env.unwrapped.dt)
        low, high = env.action_bounds()
        np.testing.assert_array_equal(low, -np.ones(4))
        np.testing.assert_array_equal(high, np.ones(4))
        assert obs["observation.images.topview"].std() > 0  # a rendered scene, not a blank frame
    finally:
        env.close()


@pytest.mark.parametrize(("camera", "turned"), [("corner2", True), ("behindGripper", False)])
def test_upside_down_cameras_are_turned_upright(camera, turned):
    env = MetaWorldEnv("reach-v3", camera=camera, image_size=(32, 48))
    try:
        frame = env.reset(seed=SEED)[f"observation.images.{camera}"]
        raw = np.asarray(env._env.render())
        np.testing.assert_array_equal(frame, raw[::-1, ::-1] if turned else raw)
        np.testing.assert_array_equal(env.render(), frame)  # video frames are the observation's
    finally:
        env.close()


def test_the_same_seed_starts_the_same_episode():
    first, second = MetaWorldEnv("reach-v3", **SMALL), MetaWorldEnv("reach-v3", **SMALL)
    try:
        a, b = first.reset(seed=5), second.reset(seed=5)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        action = np.array([0.5, -0.3, 0.2, 0.0], np.float32)
        for _ in range(5):
            step_a, step_b = first.step(action), second.step(action)
        np.testing.assert_array_equal(step_a.observation["observation.environment_state"], step_b.observation["observation.environment_state"])
        assert step_a.reward == step_b.reward
        # Other seeds pick other variations: the goal (the last 3 values) moves.
        goals = {tuple(first.reset(seed=seed)["observation.environment_state"][-3:]) for seed in range(5, 8)}
        assert len(goals) > 1
    finally:
        first.close()
        second.close()


def test_a_served_replay_of_the_expert_succeeds_and_standing_still_does_not(serve, expert):
    task, actions = expert
    report = evaluate(serve(replay(actions)).url, metaworld_config(task, episodes=1, seed=SEED))
    [episode] = report.episodes
    assert episode.success and episode.terminated and not episode.truncated
    assert episode.length == len(actions)  # ends at the success step
    assert report.env_info["name"] == f"metaworld/{task}" and report.env_info["action_dim"] == 4

    # As long as the expert needed, without moving: no success, cut at the step limit.
    still = make_builtin_policy("zeros", action_dim=4, horizon=8)
    [idle] = evaluate(serve(still).url, metaworld_config(task, episodes=1, seed=SEED, max_steps=len(actions))).episodes
    assert not idle.success and idle.truncated and not idle.terminated and idle.length == len(actions)


def test_seeds_make_results_reproducible_serial_or_parallel(serve, reach):
    server = serve(replay(reach))

    def outcomes(num_envs: int) -> list[tuple]:
        report = evaluate(server.url, metaworld_config(episodes=3, num_envs=num_envs, seed=SEED, max_steps=8))
        return [(e.seed, e.success, e.length, e.total_reward, e.requests) for e in report.episodes]

    serial = outcomes(1)
    assert [seed for seed, *_ in serial] == [SEED, SEED + 1, SEED + 2]
    # Three environments, built and stepped in parallel threads: each episode as before, to the bit.
    assert outcomes(3) == serial
    assert len({reward for _, _, _, reward, _ in serial}) == 3  # other seeds, other starts


def test_cli_replays_the_expert_to_success(reach, tmp_path, capsys):
    """The command line with a built-in policy, default 480x480 camera frames."""
    np.save(tmp_path / "expert.npy", reach)
    out = tmp_path / "run"
    code = main([
        "eval", "--env", "metaworld/reach-v3", "--policy.type", "replay", "--policy.actions", str(tmp_path / "expert.npy"),
        "--policy.horizon", "8", "--episodes", "1", "--seed", str(SEED), "--max-steps", str(len(reach) + 10),
        "--out", str(out), "--no-progress",
    ])
    assert code == 0, capsys.readouterr().err
    assert "policylink eval: metaworld/reach-v3 with builtin/replay" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["env"]["name"] == "metaworld/reach-v3" and results["env"]["action_dim"] == 4
    assert results["env"]["cameras"] == ["corner2"] and results["env"]["max_episode_steps"] == len(reach) + 10
    [episode] = results["episodes"]
    assert episode["success"] and episode["terminated"] and episode["length"] == len(reach)
    assert results["summary"]["success_rate"] == 1.0


def test_cli_random_policy_runs_episodes(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([
        "eval", "--env", "metaworld/reach-v3", "--policy.type", "random", "--episodes", "2", "--num-envs", "2",
        "--max-steps", "4", "--out", str(out), "--no-progress",
    ])
    assert code == 0, capsys.readouterr().err
    episodes = json.loads((out / "results.json").read_text())["episodes"]
    assert [(e["seed"], e["length"], e["truncated"], e["success"]) for e in episodes] == [(0, 4, True, False), (1, 4, True, False)]


def test_an_unknown_task_is_named_with_the_choices(capsys):
    assert main(["eval", "--env", "metaworld/reach-v9", "--policy.type", "random", "--episodes", "1"]) == 1
    error = capsys.readouterr().err
    assert "unknown MetaWorld task 'reach-v9'; choose one of" in error
    assert all(task in error for task in metaworld_tasks()) and "pick-place-v3" in error

    with pytest.raises(SystemExit):
        main(["eval", "--env", "metaworld/", "--policy.type", "random"])
    assert "a simulator with tasks is named metaworld/TASK" in capsys.readouterr().err
    with pytest.raises(ValueError, match="MetaWorld episodes last 1 to 500 steps"):
        MetaWorldEnv("reach-v3", max_episode_steps=501)
    with pytest.raises(ValueError, match="unknown MetaWorld camera 'side'; choose one of .*corner2"):
        MetaWorldEnv("reach-v3", camera="side")
