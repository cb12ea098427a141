"""A LeRobot robot (SO-100 / SO-101 follower, bimanual) as a policylink environment.

LeRobot robots speak dictionaries: ``get_observation()`` returns
``{"shoulder_pan.pos": float, ..., "front": HxWx3 uint8}`` and
``send_action()`` takes ``{"shoulder_pan.pos": float, ...}``. This adapter
turns them into policylink's vectors: ``observation.state`` lists the joints
in the order of ``robot.action_features`` and every camera becomes
``observation.images.<name>``. Anything with LeRobot's ``Robot`` interface
works, so the same adapter drives any robot LeRobot supports.

Safety stays where it belongs: LeRobot's ``max_relative_target`` clips on the
robot, and the executor's filters and watchdog act before that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..types import Observation
from .base import Env, StepResult

__all__ = ["RobotEnv", "make_so_follower"]

logger = logging.getLogger("policylink.robot")


class RobotEnv(Env):
    """Drives ``robot`` (a ``lerobot.robots.Robot``); connects on the first reset.

    A real robot never ends an episode by itself: episodes end by
    ``max_steps`` or an operator reset. ``calibrate`` is passed to
    ``robot.connect``.
    """

    name = "robot"

    def __init__(self, robot: Any, fps: float = 30.0, task: str | None = None, calibrate: bool = True) -> None:
        self.robot = robot
        self.fps = fps
        self.task = task
        self.calibrate = calibrate
        self.name = str(getattr(robot, "name", "robot"))
        self.joints = [key for key, kind in robot.action_features.items() if kind is float]
        if not self.joints:
            raise ValueError(f"{robot} has no float action features to drive")
        self.action_dim = len(self.joints)
        self._cameras = tuple(key for key, kind in robot.observation_features.items() if isinstance(kind, tuple))
        self._state: np.ndarray | None = None

    @property
    def camera_names(self) -> tuple[str, ...]:
        return self._cameras

    def reset(self, seed: int | None = None) -> Observation:
        if not self.robot.is_connected:
            self.robot.connect(calibrate=self.calibrate)
        return self._observe()

    def step(self, action: np.ndarray) -> StepResult:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.action_dim,):
            raise ValueError(f"{self.name} takes {self.action_dim} joint targets ({', '.join(self.joints)}), got shape {action.shape}")
        sent = self.robot.send_action({joint: float(value) for joint, value in zip(self.joints, action)})
        observation = self._observe()
        # The robot may clip the command (max_relative_target): report what it really sent.
        return StepResult(observation, info={"sent_action": self._vector(sent)})

    def state(self) -> np.ndarray | None:
        return None if self._state is None else self._state.copy()

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The joints' ranges from the motors' normalisation (LeRobot's -100..100, 0..100 or degrees), when the robot says."""
        ranges = [_joint_range(self.robot, joint) for joint in self.joints]
        if any(r is None for r in ranges):
            return None
        return np.array([r[0] for r in ranges], np.float32), np.array([r[1] for r in ranges], np.float32)  # type: ignore[index]

    def safe_stop(self) -> bool:
        """Disconnect, which turns the motors' torque off (LeRobot's ``disable_torque_on_disconnect``)."""
        if self.robot.is_connected:
            self.robot.disconnect()
        return True

    def close(self) -> None:
        if self.robot.is_connected:
            self.robot.disconnect()

    def _observe(self) -> Observation:
        raw = self.robot.get_observation()
        missing = [joint for joint in self.joints if joint not in raw]
        if missing:
            raise KeyError(f"{self.name} observation lacks {missing}")
        self._state = self._vector(raw)
        obs: Observation = {"observation.state": self._state.copy()}
        for camera in self._cameras:
            obs[f"observation.images.{camera}"] = np.asarray(raw[camera], dtype=np.uint8)
        if self.task is not None:
            obs["task"] = self.task
        return obs

    def _vector(self, values: Mapping[str, Any]) -> np.ndarray:
        return np.array([float(values[joint]) for joint in self.joints if joint in values], dtype=np.float32)

    def __repr__(self) -> str:
        return f"RobotEnv({self.name}, joints={self.action_dim}, cameras={list(self._cameras)})"


#: Command range of each LeRobot motor normalisation mode.
_NORM_RANGES = {"range_m100_100": (-100.0, 100.0), "range_0_100": (0.0, 100.0), "degrees": (-180.0, 180.0)}


def _joint_range(robot: Any, joint: str) -> tuple[float, float] | None:
    """``(low, high)`` of ``joint`` (``shoulder_pan.pos``, ``left_gripper.pos``) from the motor bus, if it can be found."""
    motor = joint.removesuffix(".pos")
    arms = [(robot, "")] + [(getattr(robot, f"{side}_arm", None), f"{side}_") for side in ("left", "right")]
    for arm, prefix in arms:
        motors = getattr(getattr(arm, "bus", None), "motors", None)
        if motors and motor.startswith(prefix) and motor[len(prefix):] in motors:
            mode = getattr(motors[motor[len(prefix):]].norm_mode, "value", None)
            return _NORM_RANGES.get(str(mode))
    return None


def make_so_follower(
    port: str | None = None,
    *,
    model: str = "so101",
    left_port: str | None = None,
    right_port: str | None = None,
    robot_id: str | None = None,
    cameras: Mapping[str, Any] | None = None,
    max_relative_target: float | None = None,
    calibration_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """A LeRobot SO-100/SO-101 follower (``port``) or a bimanual pair (``left_port`` and ``right_port``).

    ``cameras`` maps names to LeRobot ``CameraConfig`` objects (e.g.
    ``OpenCVCameraConfig(index_or_path=0, width=640, height=480, fps=30)``);
    on a bimanual robot they are attached to the left arm. Nothing is
    connected until the environment resets.
    """
    from lerobot.robots.so_follower import SOFollowerConfig, SOFollowerRobotConfig, SO100Follower, SO101Follower

    if model not in ("so100", "so101"):
        raise ValueError(f"model must be 'so100' or 'so101', got {model!r}")
    from pathlib import Path

    common: dict[str, Any] = {"calibration_dir": Path(calibration_dir)} if calibration_dir else {}
    if left_port or right_port:
        from lerobot.robots.bi_so_follower import BiSOFollower, BiSOFollowerConfig

        if not (left_port and right_port) or port:
            raise ValueError("a bimanual robot needs both left_port and right_port (and no port)")
        arms = [SOFollowerConfig(port=arm_port, max_relative_target=max_relative_target, cameras=dict(cameras or {}) if arm_port == left_port else {}) for arm_port in (left_port, right_port)]
        return BiSOFollower(BiSOFollowerConfig(id=robot_id, left_arm_config=arms[0], right_arm_config=arms[1], **common))
    if not port:
        raise ValueError("give the follower's serial port (e.g. /dev/ttyACM0), or left_port and right_port for a bimanual pair")
    config = SOFollowerRobotConfig(port=port, id=robot_id, cameras=dict(cameras or {}), max_relative_target=max_relative_target, **common)
    return (SO101Follower if model == "so101" else SO100Follower)(config)
