"""Action spaces: declared by the policy (flag or checkpoint), carried by every protocol, turned into commands by the runtime."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import numpy as np
import pytest

from conftest import POLICYLINK
from policylink import PolicyClient
from policylink.action_space import ActionSpace, anchor_state
from policylink.envs.fake import FakeEnv
from policylink.policies.builtin import ConstantPolicy
from policylink.proto.convert import frame_to_metadata, metadata_to_frame
from policylink.runtime.clock import SteppedClock
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.types import PolicyMetadata

ANCHOR = np.array([1.0, -2.0, 0.5], np.float32)
CHUNK = np.array([[0.1, 0.2, 1.0], [0.1, -0.1, 0.0], [0.3, 0.0, 1.0]], np.float32)


# -- conversion of constructed chunks ------------------------------------------


def test_absolute_chunks_are_commands_as_they_are() -> None:
    np.testing.assert_array_equal(ActionSpace.parse("joint/abs").to_absolute(CHUNK, None), CHUNK)
    np.testing.assert_array_equal(ActionSpace.parse("ee/abs").to_absolute(CHUNK, ANCHOR), CHUNK)


def test_relative_chunks_are_offsets_from_the_anchor() -> None:
    commands = ActionSpace.parse("ee/relative").to_absolute(CHUNK, ANCHOR)
    np.testing.assert_allclose(commands, [[1.1, -1.8, 1.5], [1.1, -2.1, 0.5], [1.3, -2.0, 1.5]], atol=1e-6)


def test_delta_chunks_accumulate_from_the_anchor() -> None:
    commands = ActionSpace.parse("joint/delta").to_absolute(CHUNK, ANCHOR)
    np.testing.assert_allclose(commands, [[1.1, -1.8, 1.5], [1.2, -1.9, 1.5], [1.5, -1.9, 2.5]], atol=1e-6)


@pytest.mark.parametrize("kind", ["relative", "delta"])
def test_absolute_dims_stay_commands_in_every_type(kind: str) -> None:
    commands = ActionSpace.parse(f"ee/{kind}", absolute_dims=[-1]).to_absolute(CHUNK, ANCHOR)
    np.testing.assert_array_equal(commands[:, -1], CHUNK[:, -1])  # the gripper: open / close as the policy said
    assert not np.allclose(commands[:, 0], CHUNK[:, 0])


def test_a_chunk_without_a_matching_anchor_is_refused() -> None:
    space = ActionSpace.parse("ee/delta")
    with pytest.raises(ValueError, match="need the observed state"):
        space.to_absolute(CHUNK, None)
    with pytest.raises(ValueError, match="3 values but the observed state .* has 6: the state must be in the actions' space \\(ee\\)"):
        space.to_absolute(CHUNK, np.zeros(6))
    with pytest.raises(ValueError, match="outside an action of 3 values"):
        ActionSpace.parse("ee/delta", absolute_dims=[3]).to_absolute(CHUNK, ANCHOR)


@pytest.mark.parametrize("text, message", [("ee", "expected SPACE/TYPE"), ("cartesian/abs", "unknown control space"), ("ee/velocity", "unknown control type")])
def test_bad_names_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ActionSpace.parse(text)


def test_the_anchor_is_the_observations_state_under_either_convention() -> None:
    assert anchor_state({"observation/state": [1, 2]}).tolist() == [1.0, 2.0]
    assert anchor_state({"observation.state": np.ones((1, 2)), "observation/state": [5, 5]}).tolist() == [1.0, 1.0]
    assert anchor_state({"task": "x"}) is None


# -- declared by the checkpoint or a flag, carried by the protocols -------------


def test_a_checkpoint_declares_its_space_in_policylink_json(tmp_path) -> None:
    assert ActionSpace.from_checkpoint(tmp_path) == ActionSpace()
    (tmp_path / "policylink.json").write_text(json.dumps({"ctrl_space": "ee", "ctrl_type": "relative", "ctrl_absolute_dims": [-1]}))
    assert ActionSpace.from_checkpoint(tmp_path) == ActionSpace("ee", "relative", (-1,))
    (tmp_path / "policylink.json").write_text(json.dumps({"ctrl_space": "ee", "ctrl_kind": "delta"}))
    with pytest.raises(ValueError, match="policylink.json: unknown keys \\['ctrl_kind'\\]"):
        ActionSpace.from_checkpoint(tmp_path)


def test_metadata_carries_the_space_over_websocket_and_grpc_frames() -> None:
    space = ActionSpace("ee", "delta", (6,), gripper_continuous=True)
    metadata = PolicyMetadata(7, 16, control=space)
    assert PolicyMetadata.from_dict(metadata.to_dict()).control == space
    assert PolicyMetadata.from_dict(metadata_to_frame(frame_to_metadata(metadata.to_dict()))).control == space
    assert PolicyMetadata.from_dict({"action_dim": 7, "horizon": 16}).control == ActionSpace()  # older servers: joint/abs


def test_serve_flag_reaches_clients_and_bad_flags_are_refused(serve_process: Any) -> None:
    metadata = serve_process(["--policy.action_space", "ee/delta", "--policy.absolute_dims", "-1"])
    assert metadata["ctrl_space"] == "ee" and metadata["ctrl_type"] == "delta" and metadata["ctrl_absolute_dims"] == [-1]
    for flags, message in ((["--policy.action_space", "ee/velocity"], "unknown control type"),
                           (["--policy.absolute_dims", "-1"], "need --policy.action_space"),
                           (["--policy.action_space", "ee/delta", "--policy.absolute_dims", "9"], "outside an action of 6 values")):
        done = subprocess.run([*POLICYLINK, "serve", "--host", "127.0.0.1", "--port", "1", "--policy.type", "zeros", *flags],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr, (flags, done.stderr)


@pytest.fixture
def serve_process(tmp_path):
    from conftest import free_port, wait_healthy

    processes: list[subprocess.Popen] = []

    def start(flags: list[str]) -> dict[str, Any]:
        port = free_port()
        process = subprocess.Popen([*POLICYLINK, "serve", "--host", "127.0.0.1", "--port", str(port), "--policy.type", "zeros", *flags],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        wait_healthy(port, process)
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            return client.server_metadata

    yield start
    for process in processes:
        process.terminate()
        process.wait(30)


# -- the runtime turns chunks into commands before the safety filters -----------


class Commands:
    """Records each tick's command and each chunk's verdict."""

    def __init__(self) -> None:
        self.actions: list[np.ndarray] = []
        self.rejected: list[str] = []

    def on_step(self, event: Any) -> None:
        if event.action is not None:
            self.actions.append(np.array(event.action))

    def on_chunk(self, event: Any) -> None:
        if not event.accepted:
            self.rejected.append(event.reason)

    def on_episode(self, event: Any) -> None:
        pass


def run_constant(serve, space: str, steps: int = 40, **options: Any) -> tuple[np.ndarray, np.ndarray, Commands]:
    """A constant 0.01 policy declared as ``space``, driving a fake arm that reaches each command (lag 1)."""
    policy = ConstantPolicy(value=0.01, action_dim=6, horizon=8, control=ActionSpace.parse(space, **options))
    server = serve(policy)
    env = FakeEnv(cameras=[], episode_steps=steps, lag=1.0, seed=3)
    start = env.reset().get("observation.state").copy()
    listener = Commands()
    with PolicyClient(server.url) as client:
        executor = Executor(client, env, ExecutorConfig(mode="sync", fps=30.0), clock=SteppedClock(30.0), listeners=[listener])
        executor.run(episodes=1, seed=3)
    return start, np.array(listener.actions), listener


def test_delta_chunks_drive_the_arm_step_by_step(serve) -> None:
    start, commands, listener = run_constant(serve, "joint/delta")
    assert listener.rejected == []  # the policy's range (0.01) bounds its deltas, not the commands
    expected = start[None, :] + 0.01 * np.arange(1, len(commands) + 1, dtype=np.float32)[:, None]
    np.testing.assert_allclose(commands, expected, atol=1e-5)


def test_relative_chunks_are_anchored_per_chunk(serve) -> None:
    start, commands, listener = run_constant(serve, "joint/relative", absolute_dims=[-1])
    assert listener.rejected == []
    chunk_index = np.arange(len(commands)) // 8  # each chunk holds anchor + 0.01; the next starts from where it left
    np.testing.assert_allclose(commands[:, :-1], start[None, :-1] + 0.01 * (chunk_index[:, None] + 1), atol=1e-5)
    np.testing.assert_allclose(commands[:, -1], 0.01, atol=1e-6)  # the absolute dimension is the policy's own value


def test_absolute_chunks_are_executed_as_sent(serve) -> None:
    start, commands, listener = run_constant(serve, "joint/abs")
    assert listener.rejected == []
    assert np.allclose(commands[-16:], 0.01)  # after the start-of-episode ramp from the arm's pose, the policy's values
    assert not np.allclose(start, 0.01)


def test_real_time_chunking_refuses_relative_actions() -> None:
    metadata = PolicyMetadata(6, 8, control=ActionSpace.parse("joint/delta"))

    class Declared:
        def __init__(self) -> None:
            self.metadata = metadata

        def infer(self, obs: Any) -> Any:
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="merge 'rtc' needs absolute actions: the policy's are joint/delta"):
        Executor(Declared(), FakeEnv(cameras=[]), ExecutorConfig(mode="async", merge="rtc"))
    with pytest.raises(ValueError, match="declares joint/delta actions, not ee/relative"):
        Executor(Declared(), FakeEnv(cameras=[]), ExecutorConfig(), control=ActionSpace.parse("ee/relative"))
