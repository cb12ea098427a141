"""LeRobot 0.4.4's own async-inference client code drives our compat server.

The client side here is LeRobot's: its generated ``AsyncInferenceStub``, its
``grpc_channel_options`` and ``send_bytes_in_chunks``, its
``RemotePolicyConfig`` / ``TimedObservation`` classes, and plain
``pickle.loads`` of the ``TimedAction`` list, exactly as ``robot_client`` does.
The policy is a real ACT checkpoint with random weights (tests/lerobot_checkpoints.py).
"""

from __future__ import annotations

import os
import pickle
import threading
import time

import numpy as np
import pytest

pytest.importorskip("grpc")
torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")

from lerobot.async_inference.helpers import RemotePolicyConfig, TimedAction, TimedObservation  # noqa: E402
from lerobot.datasets.utils import hw_to_dataset_features  # noqa: E402
from lerobot.transport import services_pb2, services_pb2_grpc  # noqa: E402
from lerobot.transport.utils import grpc_channel_options, send_bytes_in_chunks  # noqa: E402
from lerobot_checkpoints import act_dir, run_in_process  # noqa: E402,F401
from protocol_servers import running  # noqa: E402

import grpc  # noqa: E402
from policylink.backends.lerobot import load_from_request  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402
from policylink.server.lerobot_compat import LeRobotCompatServer  # noqa: E402
from policylink.types import Policy  # noqa: E402

MOTORS = [f"joint{i}.pos" for i in range(6)]


class LeRobotClient:
    """The calls LeRobot's ``RobotClient`` makes, with LeRobot's own stub and helpers."""

    def __init__(self, port: int, camera_shape: tuple[int, int, int]) -> None:
        # Clients are told apart by their connection; channels in one process share connections
        # unless each has its own subchannel pool (separate robot processes always differ).
        options = [*grpc_channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options)
        self.stub = services_pb2_grpc.AsyncInferenceStub(self.channel)
        hardware = {name: float for name in MOTORS} | {"front": camera_shape}
        self.features = hw_to_dataset_features(hardware, "observation", use_video=False)

    def start(self, checkpoint: str, actions_per_chunk: int = 10) -> None:
        self.stub.Ready(services_pb2.Empty())
        config = RemotePolicyConfig("act", checkpoint, self.features, actions_per_chunk, device="cpu")
        self.stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(config)))

    def send(self, observation: dict, timestep: int) -> None:
        timed = TimedObservation(timestamp=time.time(), timestep=timestep, observation=observation, must_go=True)
        self.stub.SendObservations(send_bytes_in_chunks(pickle.dumps(timed), services_pb2.Observation))

    def actions(self) -> list[TimedAction]:
        reply = self.stub.GetActions(services_pb2.Empty())
        return pickle.loads(reply.data) if reply.data else []

    def close(self) -> None:
        self.channel.close()


def _raw_observation(seed: int, shape: tuple[int, int, int]) -> dict:
    rng = np.random.default_rng(seed)
    observation = {name: float(value) for name, value in zip(MOTORS, rng.normal(size=6))}
    observation["front"] = rng.integers(0, 255, shape, dtype=np.uint8)
    observation["task"] = "pick up the cube"
    return observation


@pytest.fixture
def compat_server():
    engine = Engine(loader=load_from_request)
    server = LeRobotCompatServer(engine, "127.0.0.1", 0, obs_timeout_s=1.0)
    with running(engine, [server]):
        yield server


def test_lerobot_client_gets_timed_actions_matching_lerobot(compat_server, act_dir):
    client = LeRobotClient(compat_server.port, (48, 64, 3))
    try:
        client.start(str(act_dir), actions_per_chunk=10)
        observation = _raw_observation(0, (48, 64, 3))
        client.send(observation, timestep=5)
        actions = client.actions()
    finally:
        client.close()
    assert [type(a) for a in actions] == [TimedAction] * 10
    assert [a.get_timestep() for a in actions] == list(range(5, 15))
    assert all(isinstance(a.get_action(), torch.Tensor) and a.get_action().shape == (6,) for a in actions)
    # The same numbers as LeRobot's own load / pre-process / predict / post-process path.
    batch = {
        "observation.state": torch.tensor([[observation[name] for name in MOTORS]], dtype=torch.float32),
        "observation.images.front": torch.from_numpy(observation["front"]).permute(2, 0, 1)[None].float() / 255.0,
    }
    expected = run_in_process(act_dir, batch)[:10]
    np.testing.assert_allclose(torch.stack([a.get_action() for a in actions]).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_two_clients_share_one_loaded_model_and_big_frames_are_chunked(compat_server, act_dir):
    big = (1100, 1100, 3)  # 3.6 MB pickled: more than one 2 MiB chunk
    first, second = LeRobotClient(compat_server.port, (48, 64, 3)), LeRobotClient(compat_server.port, big)
    try:
        first.start(str(act_dir), actions_per_chunk=4)
        second.start(str(act_dir), actions_per_chunk=8)
        second.send(_raw_observation(1, big), timestep=0)
        first.send(_raw_observation(2, (48, 64, 3)), timestep=3)
        assert [a.get_timestep() for a in first.actions()] == [3, 4, 5, 6]
        assert [a.get_timestep() for a in second.actions()] == list(range(8))
        assert first.actions() == []  # nothing new sent: Empty after the server's wait, like LeRobot's server
    finally:
        first.close()
        second.close()
    stats = compat_server.engine.models.stats()
    assert stats["models_loaded"] == 1 and stats["model_cache_hits"] >= 1


def _exploit(path: str) -> bytes:
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {path}",))

    return pickle.dumps(Exploit())


def test_malicious_pickle_does_not_run_and_is_refused(compat_server, act_dir, tmp_path):
    marker = tmp_path / "pwned"
    client = LeRobotClient(compat_server.port, (48, 64, 3))
    try:
        client.stub.Ready(services_pb2.Empty())
        with pytest.raises(grpc.RpcError) as info:
            client.stub.SendPolicyInstructions(services_pb2.PolicySetup(data=_exploit(str(marker))))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "refusing to unpickle posix.system" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.stub.SendObservations(send_bytes_in_chunks(_exploit(str(marker)), services_pb2.Observation))
        assert "refusing to unpickle" in info.value.details()
        assert not marker.exists()  # the payload's os.system never ran
        # A well-formed but wrong object is refused by type.
        with pytest.raises(grpc.RpcError) as info:
            client.stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps({"policy_type": "act"})))
        assert "expected a pickled RemotePolicyConfig, got dict" in info.value.details()
        # The server keeps serving the same client.
        client.start(str(act_dir), actions_per_chunk=2)
        client.send(_raw_observation(3, (48, 64, 3)), timestep=0)
        assert len(client.actions()) == 2
    finally:
        client.close()


def test_missing_motor_is_named(compat_server, act_dir):
    client = LeRobotClient(compat_server.port, (48, 64, 3))
    try:
        client.start(str(act_dir))
        observation = _raw_observation(4, (48, 64, 3))
        del observation["joint3.pos"]
        client.send(observation, timestep=0)
        with pytest.raises(grpc.RpcError) as info:
            client.actions()
        assert "joint3.pos" in info.value.details()
    finally:
        client.close()


class FakeFollower:
    """The hardware we do not have: a 6-motor arm with one 48x64 camera, for LeRobot's ``RobotClient``."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.rng = np.random.default_rng(5)

    @property
    def observation_features(self) -> dict:
        return {name: float for name in MOTORS} | {"front": (48, 64, 3)}

    @property
    def action_features(self) -> dict:
        return {name: float for name in MOTORS}

    def connect(self, calibrate: bool = True) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def get_observation(self) -> dict:
        return _raw_observation(int(self.rng.integers(1 << 30)), (48, 64, 3))

    def send_action(self, action: dict) -> dict:
        self.sent.append(action)
        return action


def test_lerobots_robot_client_runs_against_our_server(compat_server, act_dir, monkeypatch, tmp_path):
    """LeRobot's own ``RobotClient`` (threads, action queue, must-go logic) drives a fake follower through our server."""
    import threading

    monkeypatch.chdir(tmp_path)  # RobotClient writes its log file under ./logs
    from lerobot.async_inference import robot_client
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.robots.so_follower import SO100FollowerConfig

    robot = FakeFollower()
    monkeypatch.setattr(robot_client, "make_robot_from_config", lambda config: robot)
    config = RobotClientConfig(
        policy_type="act", pretrained_name_or_path=str(act_dir), robot=SO100FollowerConfig(port="/dev/null"),
        actions_per_chunk=8, server_address=f"127.0.0.1:{compat_server.port}", fps=60, task="pick up the cube",
    )
    client = robot_client.RobotClient(config)
    assert client.start()
    receiver = threading.Thread(target=client.receive_actions, daemon=True)
    controller = threading.Thread(target=client.control_loop, args=(config.task,), daemon=True)
    receiver.start()
    controller.start()
    deadline = time.monotonic() + 60
    while len(robot.sent) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.stop()
    receiver.join(10)
    controller.join(10)
    assert len(robot.sent) >= 20, "the robot did not get 20 actions within 60 s"
    assert all(set(action) == set(MOTORS) and np.isfinite(list(action.values())).all() for action in robot.sent)


class _Held(Policy):
    """A real LeRobot policy whose calls wait for ``gate`` while ``hold`` is set: keeps the model busy on demand."""

    thread_safe = False
    hold, gate, started = threading.Event(), threading.Event(), threading.Event()

    def __init__(self, inner: Policy) -> None:
        self.inner = inner

    metadata = property(lambda self: self.inner.metadata)

    def infer(self, obs):
        if self.hold.is_set():
            self.started.set()
            assert self.gate.wait(30)
        return self.inner.infer(obs)


def test_a_full_queue_is_resource_exhausted_with_its_kind(act_dir):
    """The compat port reports a busy server as gRPC reports it (not as a bad request)."""
    from policylink import PolicyClient
    from policylink.server.engine import BatchOptions
    from policylink.server.websocket import WebSocketServer

    engine = Engine(loader=lambda request: _Held(load_from_request(request)), batching=BatchOptions(max_batch=1, max_queue=1))
    ws, compat = WebSocketServer(engine, "127.0.0.1", 0), LeRobotCompatServer(engine, "127.0.0.1", 0, obs_timeout_s=5.0)
    with running(engine, [ws, compat]):
        holder = PolicyClient(f"ws://127.0.0.1:{ws.port}", timeout=60)
        holder.configure(str(act_dir), device="cpu")
        _Held.hold.set()
        busy = threading.Thread(target=holder.infer, args=({"observation.state": np.zeros(6, np.float32), "observation.images.front": np.zeros((48, 64, 3), np.uint8)},))
        busy.start()
        client = LeRobotClient(compat.port, (48, 64, 3))
        try:
            assert _Held.started.wait(30)
            client.start(str(act_dir))
            client.send(_raw_observation(7, (48, 64, 3)), timestep=0)
            with pytest.raises(grpc.RpcError) as info:
                client.actions()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(info.value.trailing_metadata())["policylink-error-kind"] == "busy"
            assert "server busy" in info.value.details()
        finally:
            _Held.gate.set()
            busy.join(30)
            client.close()
            holder.close()
