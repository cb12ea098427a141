"""ALOHA (``gym-aloha``): bimanual insertion and cube transfer in MuJoCo, 14-d joint actions.

Observations follow LeRobot's ALOHA convention (``lerobot.envs.configs.AlohaEnv``):

- ``observation.state``: the 14 joint positions (per arm: 6 joints, then the
  gripper), float32;
- ``observation.images.top``: the top camera, 480x640 ``HxWx3`` uint8.

Actions are 14 joint position targets. The reward is the simulator's staged
reward (0 to 4: touch, lift, hand-over or contact, success); success is
reward 4, which also ends the episode. Rendering is headless (EGL by
default, see :mod:`policylink.envs.sim`).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...types import Observation
from .gym_env import GymEnv

__all__ = ["AlohaEnv", "ALOHA_TASKS"]

#: policylink's task names and gym-aloha's ids.
ALOHA_TASKS = {"insertion": "gym_aloha/AlohaInsertion-v0", "transfer_cube": "gym_aloha/AlohaTransferCube-v0"}

# gym-aloha passes each episode's object poses through a module global
# (``BOX_POSE``) that its reset writes and the physics reset reads.
_RESET_LOCK = threading.Lock()


class AlohaEnv(GymEnv):
    """The ALOHA simulator (``insertion`` or ``transfer_cube``) on the Env interface."""

    fps = 50.0
    gym_module = "gym_aloha"
    package = "gym-aloha"
    default_max_steps = 400
    reset_lock = _RESET_LOCK

    def __init__(self, task: str = "transfer_cube", max_episode_steps: int | None = None, **gym_options: Any) -> None:
        if task not in ALOHA_TASKS:
            raise ValueError(f"unknown ALOHA task {task!r}; choose one of {sorted(ALOHA_TASKS)}")
        self.gym_id = ALOHA_TASKS[task]
        self.name = f"aloha_{task}"
        # LeRobot evaluates ALOHA for 400 steps (the registration says 300).
        super().__init__(max_episode_steps or self.default_max_steps, **gym_options)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return ("top",)

    def gym_options(self) -> dict[str, Any]:
        return {"obs_type": "pixels_agent_pos", "render_mode": "rgb_array"}

    def map_observation(self, raw: Any) -> Observation:
        return {
            "observation.state": np.asarray(raw["agent_pos"], dtype=np.float32),
            "observation.images.top": np.ascontiguousarray(raw["pixels"]["top"], dtype=np.uint8),
        }
