"""The LeRobot robot adapter on LeRobot's real SO-101 follower classes with a fake motor bus and camera.

LeRobot 0.4.4 ships no mock robot; only the hardware (the Feetech serial bus
and the camera) is faked here, LeRobot's robot logic runs as on a real arm.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scservo_sdk")

from lerobot.cameras.opencv import OpenCVCameraConfig  # noqa: E402

from policylink.client import PolicyClient  # noqa: E402
from policylink.envs.robot import RobotEnv, make_so_follower  # noqa: E402
from policylink.policies.builtin import ReplayPolicy  # noqa: E402
from policylink.runtime.clock import SteppedClock  # noqa: E402
from policylink.runtime.executor import Executor, ExecutorConfig  # noqa: E402

pytestmark = pytest.mark.lerobot


class FakeMotorBus:
    """Stands in for a FeetechMotorsBus: joints reach their goal at once; every write is logged."""

    def __init__(self, motors: dict) -> None:
        self.motors = motors
        self.is_connected = False
        self.is_calibrated = True
        self.position = {name: 0.0 for name in motors}
        self.goals: list[dict[str, float]] = []

    def connect(self) -> None:
        self.is_connected = True

    def disconnect(self, disable_torque: bool = True) -> None:
        self.is_connected = False

    @contextlib.contextmanager
    def torque_disabled(self):
        yield

    def configure_motors(self) -> None:
        pass

    def write(self, register: str, motor: str, value: float) -> None:
        pass

    def sync_read(self, register: str) -> dict[str, float]:
        assert register == "Present_Position"
        return dict(self.position)

    def sync_write(self, register: str, values: dict[str, float]) -> None:
        assert register == "Goal_Position"
        self.goals.append(dict(values))
        self.position.update(values)


class FakeCamera:
    def __init__(self, height: int, width: int) -> None:
        self.frame = np.full((height, width, 3), 7, np.uint8)
        self.is_connected = False

    def connect(self) -> None:
        self.is_connected = True

    def disconnect(self) -> None:
        self.is_connected = False

    def read_latest(self) -> np.ndarray:
        return self.frame


def so101(tmp_path: Path, **options) -> tuple[object, FakeMotorBus]:
    camera = OpenCVCameraConfig(index_or_path=0, width=32, height=24, fps=30)
    robot = make_so_follower("/dev/fake-so101", cameras={"front": camera}, calibration_dir=tmp_path, **options)
    robot.bus = FakeMotorBus(robot.bus.motors)
    robot.cameras["front"] = FakeCamera(24, 32)
    return robot, robot.bus


def test_adapter_maps_lerobot_dicts_to_vectors(tmp_path: Path):
    robot, bus = so101(tmp_path)
    env = RobotEnv(robot, calibrate=False)
    assert env.action_dim == 6 and env.camera_names == ("front",)
    assert env.joints[0] == "shoulder_pan.pos" and env.joints[-1] == "gripper.pos"
    obs = env.reset()
    assert robot.is_connected
    assert obs["observation.state"].shape == (6,) and obs["observation.images.front"].shape == (24, 32, 3)
    target = np.arange(6, dtype=np.float32)
    result = env.step(target)
    assert bus.goals[-1] == {"shoulder_pan": 0.0, "shoulder_lift": 1.0, "elbow_flex": 2.0, "wrist_flex": 3.0, "wrist_roll": 4.0, "gripper": 5.0}
    np.testing.assert_array_equal(result.observation["observation.state"], target)
    with pytest.raises(ValueError, match="takes 6 joint targets"):
        env.step(np.zeros(12))
    env.close()
    assert not robot.is_connected


def test_lerobot_max_relative_target_clips_and_is_reported(tmp_path: Path):
    robot, _ = so101(tmp_path, max_relative_target=1.0)
    env = RobotEnv(robot, calibrate=False)
    env.reset()
    result = env.step(np.full(6, 10.0, np.float32))
    np.testing.assert_allclose(result.info["sent_action"], np.ones(6))


def test_bimanual_has_twelve_joints(tmp_path: Path):
    robot = make_so_follower(left_port="/dev/left", right_port="/dev/right", calibration_dir=tmp_path)
    env = RobotEnv(robot, calibrate=False)
    assert env.action_dim == 12
    assert env.joints[0] == "left_shoulder_pan.pos" and env.joints[6] == "right_shoulder_pan.pos"
    with pytest.raises(ValueError, match="both left_port and right_port"):
        make_so_follower(left_port="/dev/left", calibration_dir=tmp_path)


def test_executor_drives_the_arm_through_lerobot(serve, tmp_path: Path):
    policy = ReplayPolicy(action_dim=6, horizon=16, cameras={"front": (24, 32)})
    server = serve(policy)
    robot, bus = so101(tmp_path)
    env = RobotEnv(robot, calibrate=False)
    with PolicyClient(server.url) as client:
        executor = Executor(client, env, ExecutorConfig(mode="async", n_action_steps=8, max_steps=30), clock=SteppedClock(30, 2))
        executor.run(episodes=1)
        executor.close()
    env.close()
    assert len(bus.goals) == 30
    sent = np.array([[goal[name] for name in bus.motors] for goal in bus.goals])
    # Every command stays in the joints' ranges from LeRobot's normalisation (degrees here; the gripper 0..100).
    low, high = env.action_bounds()
    assert low.tolist() == [-180.0] * 5 + [0.0] and high.tolist() == [180.0] * 5 + [100.0]
    np.testing.assert_allclose(sent, np.clip(policy.trajectory[:30], low, high), atol=1e-6)
    assert np.any(policy.trajectory[:30, 5] < 0) and np.all(sent[:, 5] >= 0)  # the gripper's negative targets were bounded


def test_run_flags_build_a_lerobot_follower(tmp_path: Path):
    from policylink.cli import build_parser
    from policylink.cli.run import make_env

    args = build_parser().parse_args([
        "run", "--env", "robot", "--robot.left_port", "/dev/left", "--robot.right_port", "/dev/right",
        "--robot.cameras", "top=0:48x64,wrist=/dev/video2:24x32", "--robot.max_relative_target", "5",
    ])
    env = make_env(args)
    assert isinstance(env, RobotEnv) and env.action_dim == 12
    assert env.camera_names == ("left_top", "left_wrist")  # LeRobot prefixes a bimanual robot's cameras
    assert env.robot.left_arm.config.max_relative_target == 5
    bad = build_parser().parse_args(["run", "--env", "robot", "--robot.port", "/dev/x", "--robot.cameras", "front=0"])
    with pytest.raises(ValueError, match="expected NAME=INDEX_OR_PATH:HxW"):
        make_env(bad)
