"""Legacy MetaObs / MetaAction pickle clients, unchanged, on ``serve --legacy-tcp-port``.

The client is ``tests/legacy_client/client.py`` with its own
``benchmark/base.py``, run as a separate process: nothing of policylink is
imported there, and the server process never imports ``benchmark``.
"""

from __future__ import annotations

import json
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import POLICYLINK, free_port, wait_healthy
from policylink.action_space import ActionSpace
from policylink.errors import RequestError
from policylink.server.engine import Engine
from policylink.server.legacy_tcp import ERROR_PREFIX, LegacyTcpServer, dump_error, dump_meta_actions
from policylink.types import Feature, Observation, Policy, PolicyMetadata, Reply
from protocol_servers import running

CLIENT_DIR = Path(__file__).parent / "legacy_client"
STATE_DIM, HORIZON = 7, 16
CAMERAS = ("front", "wrist")


class StateRamp(Policy):
    """Answers ``state + 0.01 * step`` for each step of the chunk, after checking the images it was given."""

    thread_safe = True

    def __init__(self, control: ActionSpace) -> None:
        features = {"observation.state": Feature((STATE_DIM,), "float32")}
        features.update({f"observation.images.{name}": Feature((48, 64, 3), "uint8") for name in CAMERAS})
        self._metadata = PolicyMetadata(STATE_DIM, HORIZON, input_features=features, camera_names=CAMERAS, control=control)
        self.tasks: list[str] = []

    @property
    def metadata(self) -> PolicyMetadata:
        return self._metadata

    def infer(self, obs: Observation) -> Reply:
        for name in CAMERAS:
            image = obs[f"observation.images.{name}"]
            assert image.shape == (48, 64, 3) and image.dtype == np.uint8, (name, image.shape, image.dtype)
        state = np.asarray(obs["observation.state"], np.float32)
        if state.shape != (STATE_DIM,):
            raise RequestError(f"state has {state.size} values, policy expects {STATE_DIM}")
        self.tasks.append(obs.get("task"))
        return {"actions": state[None, :] + 0.01 * np.arange(HORIZON, dtype=np.float32)[:, None]}


def run_client(port: int, scenario: str, cameras: int = len(CAMERAS), state_dim: int = STATE_DIM) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "client.py", "127.0.0.1", str(port), scenario, str(state_dim), str(cameras)],
        cwd=CLIENT_DIR, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def legacy_server():
    policy = StateRamp(ActionSpace.parse("ee/delta", absolute_dims=[-1], gripper_continuous=True))
    engine = Engine(policy)
    with running(engine, [LegacyTcpServer(engine, "127.0.0.1", 0)]) as (server,):
        yield server, policy, engine


def test_five_requests_on_one_connection_get_the_clients_own_meta_actions(legacy_server) -> None:
    server, policy, engine = legacy_server
    replies = run_client(server.port, "five")
    assert len(replies) == 5
    for t, reply in enumerate(replies):
        assert "error" not in reply, reply
        assert reply["count"] == HORIZON and reply["own_class"] is True
        assert reply["ctrl_space"] == ["ee"] and reply["ctrl_type"] == ["delta"] and reply["gripper_continuous"] == [True]
        assert reply["action_shapes"] == [[STATE_DIM]]
        expected = np.full(STATE_DIM, 0.1 * t, np.float32)[None, :] + 0.01 * np.arange(HORIZON, dtype=np.float32)[:, None]
        np.testing.assert_allclose(reply["actions"], expected, rtol=0, atol=1e-6)  # the MetaObs state reached the policy
    assert policy.tasks == ["pick up the cube"] * 5
    assert "benchmark" not in sys.modules  # the server never imported the client's code


def test_a_refused_request_shows_its_reason_in_the_clients_log_and_the_connection_goes_on(legacy_server) -> None:
    server, _, _ = legacy_server
    bad, good = run_client(server.port, "bad-then-good")
    assert bad["error"].startswith("ValueError: could not convert string to float: ")
    assert f"{ERROR_PREFIX} (bad_request): state has 13 values, policy expects 7" in bad["error"], bad
    assert good.get("count") == HORIZON, good


def test_hostile_and_foreign_pickles_are_refused_by_the_restricted_unpickler(legacy_server) -> None:
    server, policy, _ = legacy_server
    hostile, after = run_client(server.port, "hostile")
    assert "refusing to unpickle posix.system" in hostile["error"], hostile
    assert after.get("count") == HORIZON
    (foreign,) = run_client(server.port, "foreign-module")
    assert "mylab.types.MetaObs" in foreign["error"] and "--legacy-module mylab.types" in foreign["error"], foreign
    assert len(policy.tasks) == 1  # neither reached the policy


def test_replies_are_pickles_that_name_the_clients_class_and_nothing_else() -> None:
    actions = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = dump_meta_actions(actions, ActionSpace.parse("joint/relative"), "lab.meta")
    import pickletools

    globals_named = [arg for op, arg, _ in pickletools.genops(body) if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and arg in ("lab.meta", "MetaAction")]
    assert globals_named.count("lab.meta") == 1 and globals_named.count("MetaAction") == 1  # written once, then memoized
    with pytest.raises(ModuleNotFoundError, match="lab"):
        pickle.loads(body)  # a reader without the client's module cannot build it: nothing of ours stands in
    with pytest.raises(ValueError, match="could not convert string to float: 'boom'"):
        pickle.loads(dump_error("boom"))


def test_serve_command_opens_the_legacy_port_with_the_declared_action_space(tmp_path) -> None:
    ws_port, legacy_port = free_port(), free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--host", "127.0.0.1", "--port", str(ws_port), "--policy.type", "constant", "--policy.value", "0.25",
         "--policy.action_dim", str(STATE_DIM), "--policy.cameras", "front=48x64,wrist=48x64",
         "--policy.action_space", "joint/relative", "--legacy-tcp-port", str(legacy_port), "--trust-pickle"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        frame = wait_healthy(ws_port, process)
        assert frame is not None
        replies = run_client(legacy_port, "five")
        assert [r["count"] for r in replies] == [HORIZON] * 5
        assert all(r["ctrl_space"] == ["joint"] and r["ctrl_type"] == ["relative"] and r["gripper_continuous"] == [False] for r in replies)
        assert np.allclose(replies[0]["actions"], 0.25)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "legacy pickle clients (benchmark.base.MetaObs -> MetaAction)" in output, output


@pytest.mark.parametrize("extra, message", [
    ([], "--legacy-tcp-port needs --trust-pickle"),
    (["--trust-pickle", "--api-key", "k" * 16], "cannot be locked with an API key"),
])
def test_serve_refuses_an_unsafe_legacy_port(extra: list[str], message: str) -> None:
    done = subprocess.run([*POLICYLINK, "serve", "--host", "127.0.0.1", "--port", str(free_port()), "--policy.type", "zeros",
                           "--legacy-tcp-port", str(free_port()), *extra], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and message in done.stderr + done.stdout, done.stderr



def _frame(sock: socket.socket, payload: bytes) -> Any:
    """Send one length-prefixed frame; the reply as the legacy client's pickle.loads sees it (or the error it raises)."""
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    (length,) = struct.unpack(">I", _recv(sock, 4))
    try:
        return pickle.loads(_recv(sock, length))
    except ValueError as exc:
        return str(exc)


def _recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def test_garbage_and_oversized_frames_get_clear_errors_and_other_clients_are_served() -> None:
    policy = StateRamp(ActionSpace())
    engine = Engine(policy)
    with running(engine, [LegacyTcpServer(engine, "127.0.0.1", 0, max_frame_bytes=64 * 1024)]) as (server,):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            garbage = _frame(sock, b"\x81\xa5hello")  # msgpack, not a pickle
            assert "malformed pickle" in garbage and "this legacy port takes pickled MetaObs frames" in garbage, garbage
            truncated = _frame(sock, pickle.dumps({"state": np.zeros(STATE_DIM)})[:-5])
            assert "malformed pickle" in truncated, truncated
            sock.sendall(struct.pack(">I", 10 * 2**20))  # announces 10 MiB on a 64 KiB port
            (length,) = struct.unpack(">I", _recv(sock, 4))
            with pytest.raises(ValueError, match="frame of 10485760 bytes exceeds the 65536-byte limit"):
                pickle.loads(_recv(sock, length))
            assert sock.recv(1) == b""  # the byte stream cannot be resynchronised: closed
        assert [r["count"] for r in run_client(server.port, "five")] == [HORIZON] * 5  # everyone else is served
