"""``policylink eval`` on PushT against real local servers: success detection, simulated latency,
the results file and the command line. Built-in policies only (no torch needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from policylink.cli import main  # noqa: E402
from policylink.envs.sim.pusht import PushTEnv  # noqa: E402
from policylink.evaluation import EvalConfig, ExecutionConfig, evaluate, wilson_interval  # noqa: E402
from policylink.policies.builtin import ReplayPolicy  # noqa: E402

GOAL = np.array([256.0, 256.0])
# gym-pusht places the block, then rotates it about its centre of mass: a
# block passed at GOAL - SHIFT with the goal's angle ends up on the goal.
SHIFT = np.array([31.81980515, 13.18019485])


def scripted_push() -> tuple[list[float], np.ndarray]:
    """A start state with the T just off its goal, and pusher targets that push it home.

    Returns the start state and the recorded actions, padded by holding the
    last target, so a replay can run past the success step.
    """
    block = GOAL + [25.0, -25.0]
    direction = (GOAL - block) / np.linalg.norm(GOAL - block)
    pusher = block - 50.0 * direction
    state = [*pusher, *(block - SHIFT), np.pi / 4]
    env = PushTEnv(obs_type="environment_state_agent_pos", initial_state=state)
    actions = []
    try:
        env.reset(seed=0)
        for _ in range(60):
            pusher = pusher + 3.0 * direction
            actions.append(pusher.astype(np.float32))
            if env.step(actions[-1]).success:
                break
    finally:
        env.close()
    assert len(actions) < 60, "the scripted push should reach the goal"
    return state, np.array(actions + [actions[-1]] * 60)


@pytest.fixture(scope="module")
def push() -> tuple[list[float], np.ndarray]:
    return scripted_push()


def pusht_config(state: list[float], **options) -> EvalConfig:
    options.setdefault("max_steps", 50)
    return EvalConfig(env="pusht", env_options={"initial_state": state, "obs_type": "environment_state_agent_pos"}, **options)


def test_a_replayed_successful_push_is_detected(serve, push):
    state, actions = push
    server = serve(ReplayPolicy(actions=actions, horizon=8))
    report = evaluate(server.url, pusht_config(state, episodes=2, num_envs=2))
    steps_to_goal = int(np.argmax(np.all(actions == actions[-1], axis=1))) + 1
    for episode in report.episodes:
        assert episode.success and episode.terminated and not episode.truncated
        assert episode.length == steps_to_goal
        assert episode.max_reward == 1.0  # gym-pusht's reward: coverage / 0.95, clipped to 1
    assert report.summary["success_rate"] == 1.0 and report.summary["success_ci95"][0] > 0.0


def test_standing_still_is_not_a_success(serve, push):
    state, _ = push
    hold = np.tile(np.array(state[:2], np.float32), (16, 1))
    server = serve(ReplayPolicy(actions=hold, horizon=8))
    report = evaluate(server.url, pusht_config(state, episodes=1, max_steps=20))
    [episode] = report.episodes
    assert not episode.success and episode.truncated and episode.length == 20
    assert 0.0 < episode.max_reward < 1.0


def test_async_latency_compensation_keeps_the_replay_on_time(serve, push):
    """Chunks arrive 3 steps late; dropping their past actions keeps the push exact."""
    state, actions = push
    server = serve(ReplayPolicy(actions=actions, horizon=8))
    on_time = evaluate(server.url, pusht_config(state, episodes=1)).episodes[0]
    late = evaluate(server.url, pusht_config(state, episodes=1, execution=ExecutionConfig(mode="async", sim_latency_steps=3))).episodes[0]
    assert late.success and late.length == on_time.length
    assert late.dropped_actions >= 3 and late.held_steps == 0
    assert late.total_reward == pytest.approx(on_time.total_reward)


def test_sync_latency_holds_the_robot_while_it_waits(serve, push):
    state, actions = push
    server = serve(ReplayPolicy(actions=actions, horizon=8))
    waiting = evaluate(server.url, pusht_config(state, episodes=1, execution=ExecutionConfig(mode="sync", sim_latency_steps=2))).episodes[0]
    # Every chunk after the first costs 2 steps standing still.
    assert waiting.requests >= 2 and waiting.held_steps == 2 * (waiting.requests - 1)
    assert waiting.success and waiting.dropped_actions == 0


def test_results_file_and_video(tmp_path, push, capsys):
    state, actions = push
    np.save(tmp_path / "push.npy", actions)
    out = tmp_path / "run"
    code = main([
        "eval", "--env", "pusht", "--policy.type", "replay", "--policy.actions", str(tmp_path / "push.npy"),
        "--policy.horizon", "8", "--episodes", "3", "--num-envs", "2", "--seed", "5", "--max-steps", "12",
        "--videos", "1", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "success rate" in printed and "episodes/min" in printed and str(out / "results.json") in printed

    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1
    assert results["env"]["name"] == "pusht" and results["env"]["action_dim"] == 2
    assert results["policy"]["model_id"] == "builtin/replay"
    assert results["config"]["seeds"] == [5, 6, 7] and results["config"]["num_envs"] == 2
    summary = results["summary"]
    for key in ("success_rate", "success_ci95", "return", "length", "roundtrip_ms", "infer_ms", "episodes_per_minute"):
        assert key in summary
    assert set(summary["roundtrip_ms"]) == {"p50", "p99"}
    episodes = results["episodes"]
    assert [episode["index"] for episode in episodes] == [0, 1, 2]
    assert [episode["seed"] for episode in episodes] == [5, 6, 7]
    for episode in episodes:
        assert isinstance(episode["return"], float) and isinstance(episode["success"], bool)
        assert episode["length"] == 12 and episode["requests"] == 2 and len(episode["roundtrip_ms"]) == 2
    assert episodes[0]["video"] == "videos/episode_0000.mp4" and episodes[1]["video"] is None

    import imageio.v2 as imageio

    with imageio.get_reader(out / episodes[0]["video"]) as video:
        frames = [frame for frame in video]
    assert len(frames) == 12 + 1  # the reset, then every step
    assert frames[0].shape == (680, 680, 3)


def test_a_failed_episode_leaves_no_partial_video(serve, tmp_path):
    """Frames stream to the file as the episode runs; an episode that fails midway leaves no video behind."""
    from policylink.errors import ServerError

    actions = np.full((32, 2), 256.0, np.float32)
    actions[8:] = np.nan  # the second chunk fails, after 8 frames went to the encoder
    server = serve(ReplayPolicy(actions=actions, horizon=8))
    out = tmp_path / "run"
    with pytest.raises(ServerError, match="non-finite"):
        evaluate(server.url, EvalConfig(env="pusht", episodes=1, max_steps=20, videos=1, out=out))
    assert not (out / "videos" / "episode_0000.mp4").exists()


def test_an_action_size_mismatch_is_named(serve):
    server = serve(ReplayPolicy(action_dim=6))
    with pytest.raises(ValueError, match="outputs 6 values per action, but pusht takes 2"):
        evaluate(server.url, EvalConfig(env="pusht", episodes=1, max_steps=5))


def test_cli_says_what_is_missing(capsys):
    assert main(["eval", "--env", "pusht", "--episodes", "1"]) == 1
    assert "nothing to evaluate: give --server URL, --policy.path DIR or --policy.type NAME" in capsys.readouterr().err


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(10, 10)
    assert round(low, 4) == 0.7225 and high == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_an_openpi_style_server_without_metadata_or_commands(push):
    """A server that sends an empty metadata map and knows no commands (as openpi's may) is evaluated too."""
    import threading

    msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")
    from websockets.sync.server import serve as ws_serve

    state, actions = push
    policy = ReplayPolicy(actions=actions, horizon=8)
    seen: list[dict] = []

    def handler(ws) -> None:
        packer = msgpack_numpy.Packer()
        ws.send(packer.pack({}))
        for message in ws:
            obs = msgpack_numpy.unpackb(message)
            seen.append(obs)
            ws.send(packer.pack({"actions": policy.infer(obs)["actions"]}))

    with ws_serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        report = evaluate(url, pusht_config(state, episodes=1))
        server.shutdown()
    assert report.episodes[0].success
    assert report.policy["model_id"] == "unknown"
    assert all("__command__" not in obs for obs in seen)  # no reset sent


@pytest.mark.parametrize("first_bad_step", [0, 8])
def test_a_failing_server_ends_the_evaluation_with_its_error(serve, first_bad_step):
    """A robot holds through failed requests; an evaluation stops and says why (and does not hang)."""
    from policylink.errors import ServerError

    actions = np.full((32, 2), 256.0, np.float32)
    actions[first_bad_step:] = np.nan
    server = serve(ReplayPolicy(actions=actions, horizon=8))
    with pytest.raises(ServerError, match="non-finite"):
        evaluate(server.url, EvalConfig(env="pusht", episodes=2, num_envs=2, max_steps=20))
