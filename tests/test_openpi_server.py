"""policylink's client, ``infer``, ``run`` and executor against a server that behaves as openpi's does.

The server (``openpi_like_server.py``) hands every map to its policy, so a
policylink command or field would reach the policy (and fail it): the
assertions check what it received as much as what came back.
"""

from __future__ import annotations

import subprocess
from typing import Any

import numpy as np
import pytest

from conftest import POLICYLINK
from openpi_like_server import OpenpiLikeServer, OpenpiStylePolicy
from policylink import PolicyClient
from policylink.envs.fake import FakeEnv
from policylink.errors import NotAllowed, ServerError
from policylink.runtime.clock import SteppedClock
from policylink.runtime.executor import Executor, ExecutorConfig

OPENPI_KEYS = {"observation/state", "observation/image", "prompt"}


def openpi_observation(dim: int = 6, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "observation/state": rng.uniform(-0.1, 0.1, dim).astype(np.float32),
        "observation/image": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        "prompt": "lift the cube",
    }


def assert_only_observations(received: list[dict[str, Any]], step: bool = False) -> None:
    """Nothing policylink-only reached the server: no commands, no ``__...__`` fields (the executor's ``step`` is an observation field)."""
    for message in received:
        assert set(message) == OPENPI_KEYS | ({"step"} if step else set()), sorted(message)


def test_client_detects_a_plain_server_and_sends_it_observations_only() -> None:
    with OpenpiLikeServer() as server, PolicyClient(server.url, timeout=10) as client:
        assert client.speaks_policylink is False
        assert client.metadata is None  # no action size announced, no reply yet
        client.reset()  # openpi has no reset: nothing may be sent
        with pytest.raises(NotAllowed, match="not a policylink server"):
            client.configure("/models/act")
        assert server.received == []
        chunk = client.infer({**openpi_observation(), "__seed__": 3})
        assert chunk.shape == (10, 6) and chunk.server_timing["infer_ms"] >= 0
        metadata = client.metadata
        assert (metadata.action_dim, metadata.horizon, metadata.policy_type) == (6, 10, "openpi")
        assert_only_observations(server.received)  # no __timeout_ms__, no __seed__


def test_a_failing_request_raises_the_servers_traceback_and_the_next_one_reconnects() -> None:
    with OpenpiLikeServer() as server, PolicyClient(server.url, timeout=10) as client:
        client.infer(openpi_observation())
        with pytest.raises(ServerError, match="KeyError: 'observation/state'"):
            client.infer({"prompt": "no state"})
        chunk = client.infer(openpi_observation(seed=1))  # the server closed with 1011: a fresh connection
        assert chunk.shape == (10, 6)
        assert client.reconnects == 1 and server.connections == 2 and len(server.errors) == 1


def test_executor_runs_two_episodes_against_it_without_a_request_error() -> None:
    env = FakeEnv(cameras=["front"], image_size=(48, 64), episode_steps=25, keys="openpi", task="lift the cube")
    with OpenpiLikeServer() as server, PolicyClient(server.url, timeout=10) as client:
        executor = Executor(client, env, ExecutorConfig(mode="async", fps=30.0, task="ignored: the env has a prompt"),
                            clock=SteppedClock(30.0, latency_steps=2))
        executor.run(episodes=2)
        results = list(executor.episode_results)
    assert [r["steps"] for r in results] == [25, 25], results
    assert all(not r["info"].get("error") for r in results), results
    assert executor.stats.errors == 0 and executor.stats.rejected_chunks == 0 and server.errors == []
    assert len(server.received) >= 4
    assert_only_observations(server.received, step=True)
    assert {m["prompt"] for m in server.received} == {"lift the cube"}


def test_infer_command_against_it() -> None:
    with OpenpiLikeServer(OpenpiStylePolicy(action_dim=8)) as server:
        done = subprocess.run([*POLICYLINK, "infer", "--server", server.url, "--repeat", "2", "--task", "open the drawer"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "not a policylink server (openpi protocol)" in done.stdout
        assert "action_dim=8, horizon=10 (from its first reply)" in done.stdout
        assert done.stdout.count("chunk (10, 8)") == 2, done.stdout
        assert server.errors == [] and len(server.received) == 2
        assert_only_observations(server.received)
        assert server.received[0]["observation/image"].shape == (224, 224, 3)
        assert {m["prompt"] for m in server.received} == {"open the drawer"}


def test_run_command_drives_two_episodes_against_it(tmp_path) -> None:
    with OpenpiLikeServer() as server:
        done = subprocess.run(
            [*POLICYLINK, "run", "--server", server.url, "--env", "fake", "--env.keys", "openpi", "--env.cameras", "front",
             "--env.image_size", "48x64", "--env.episode_steps", "20", "--episodes", "2", "--sim-latency-steps", "1",
             "--task", "stack the cubes"],
            capture_output=True, text=True, timeout=180,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "not a policylink server" in done.stdout and "2 episode(s)" in done.stdout and " 0 request errors" in done.stdout, done.stdout
        assert server.errors == []
        assert_only_observations(server.received[:1])  # the probe: the environment's own observation
        assert_only_observations(server.received[1:], step=True)
        assert {m["prompt"] for m in server.received} == {"stack the cubes"}


def test_run_command_explains_a_refused_first_observation() -> None:
    with OpenpiLikeServer() as server:
        done = subprocess.run([*POLICYLINK, "run", "--server", server.url, "--env", "fake", "--env.cameras", "", "--episodes", "1"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "refused the environment's first observation" in done.stderr and "--env.keys openpi" in done.stderr, done.stderr


def test_the_client_declares_a_plain_servers_relative_actions() -> None:
    from policylink.action_space import ActionSpace

    chunks: list[Any] = []
    listener = type("Chunks", (), {"on_chunk": lambda self, e: chunks.append(e), "on_step": lambda self, e: None,
                                   "on_episode": lambda self, e: None})()
    env = FakeEnv(cameras=["front"], image_size=(48, 64), episode_steps=10, keys="openpi", task="lift", lag=1.0)
    start = env.reset()["observation/state"].copy()
    with OpenpiLikeServer() as server, PolicyClient(server.url, timeout=10) as client:
        executor = Executor(client, env, ExecutorConfig(mode="sync", fps=30.0), clock=SteppedClock(30.0), listeners=[listener],
                            control=ActionSpace.parse("joint/relative"))
        executor.run(episodes=1, seed=0)
    first = chunks[0]
    assert first.accepted and server.errors == []
    raw = start[None, :] + 0.01 * np.arange(10, dtype=np.float32)[:, None]  # what the server sent for the first observation
    np.testing.assert_allclose(first.actions, start[None, :] + raw, atol=1e-6)  # anchored on that observation's state


def test_the_executors_task_goes_to_a_plain_server_as_its_prompt() -> None:
    env = FakeEnv(cameras=["front"], image_size=(48, 64), episode_steps=5, keys="openpi")  # no instruction of its own
    with OpenpiLikeServer() as server, PolicyClient(server.url, timeout=10) as client:
        executor = Executor(client, env, ExecutorConfig(mode="sync", fps=30.0, task="push the block"), clock=SteppedClock(30.0))
        executor.run(episodes=1)
    assert server.errors == [] and server.received
    assert_only_observations(server.received, step=True)
    assert {m["prompt"] for m in server.received} == {"push the block"}


def test_the_jump_check_reads_openpis_state_key_when_the_environment_reports_none() -> None:
    from policylink.runtime.filters import ChunkValidator

    class NoStateEnv(FakeEnv):
        def state(self):  # like a robot that reports no joint state: only its observation has one
            return None

    class FarOff(OpenpiStylePolicy):
        def infer(self, obs):
            reply = super().infer(obs)
            reply["actions"] = reply["actions"] + 1.0  # starts 1.0 away from the observed state
            return reply

    env = NoStateEnv(cameras=["front"], image_size=(48, 64), episode_steps=5, keys="openpi", task="lift")
    chunks: list[Any] = []
    listener = type("Chunks", (), {"on_chunk": lambda self, e: chunks.append(e), "on_step": lambda self, e: None,
                                   "on_episode": lambda self, e: None})()
    with OpenpiLikeServer(FarOff()) as server, PolicyClient(server.url, timeout=10) as client:
        executor = Executor(client, env, ExecutorConfig(mode="sync", fps=30.0, first_chunk_attempts=2), clock=SteppedClock(30.0),
                            listeners=[listener], validator=ChunkValidator(max_jump=0.5))
        executor.run(episodes=1)
    assert chunks and not chunks[0].accepted  # the state came from observation/state
    assert "away from the current state" in chunks[0].reason, chunks[0].reason
