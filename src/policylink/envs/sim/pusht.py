"""PushT (``gym-pusht``): push a T-shaped block onto its goal pose, 2-d actions.

Observations follow LeRobot's PushT convention (``lerobot.envs.configs.PushtEnv``):

- ``observation.state``: the pusher's position ``(x, y)`` in pixels of the
  512x512 table, float32;
- ``observation.image``: the 96x96 (by default) top view, ``HxWx3`` uint8,
  with ``obs_type="pixels_agent_pos"`` (the default);
- ``observation.environment_state``: the block's 8 key points ``(16,)``,
  with ``obs_type="environment_state_agent_pos"`` (no image).

Actions are the pusher's target position, ``(2,)`` in ``[0, 512]``. The
reward is the simulator's: the block's coverage of the goal divided by 0.95,
clipped to 1; success is coverage above 95 %, which also ends the episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...types import Observation
from .gym_env import GymEnv

__all__ = ["PushTEnv"]

OBS_TYPES = ("pixels_agent_pos", "environment_state_agent_pos")


class PushTEnv(GymEnv):
    """The PushT simulator on the :class:`~policylink.envs.Env` interface.

    ``initial_state`` (``[agent_x, agent_y, block_x, block_y, block_angle]``)
    starts every episode from that state instead of a seeded random one; it is
    handed to gym-pusht's ``reset_to_state`` unchanged, legacy quirk included
    (the block is placed before it is rotated about its centre of mass).
    """

    name = "pusht"
    fps = 10.0
    gym_id = "gym_pusht/PushT-v0"
    gym_module = "gym_pusht"
    package = "gym-pusht"
    default_max_steps = 300

    def __init__(
        self,
        obs_type: str = "pixels_agent_pos",
        image_size: tuple[int, int] = (96, 96),
        max_episode_steps: int | None = None,
        initial_state: Sequence[float] | None = None,
        **gym_options: Any,
    ) -> None:
        if obs_type not in OBS_TYPES:
            raise ValueError(f"PushT obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
        if initial_state is not None and len(initial_state) != 5:
            raise ValueError(f"PushT initial_state needs 5 values (agent x, y, block x, y, angle), got {len(initial_state)}")
        self.obs_type = obs_type
        self.image_size = image_size
        self.initial_state = None if initial_state is None else [float(v) for v in initial_state]
        super().__init__(max_episode_steps, **gym_options)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return ("image",) if self.obs_type == "pixels_agent_pos" else ()

    def gym_options(self) -> dict[str, Any]:
        height, width = self.image_size
        return {"obs_type": self.obs_type, "render_mode": "rgb_array", "observation_height": height, "observation_width": width}

    def reset(self, seed: int | None = None) -> Observation:
        if self.initial_state is None:
            return super().reset(seed)
        raw, _info = self._env.reset(seed=seed, options={"reset_to_state": self.initial_state})
        self._last = self._with_task(self.map_observation(raw))
        return self._last

    def map_observation(self, raw: Any) -> Observation:
        obs: Observation = {"observation.state": np.asarray(raw["agent_pos"], dtype=np.float32)}
        if "pixels" in raw:
            obs["observation.image"] = np.ascontiguousarray(raw["pixels"], dtype=np.uint8)
        if "environment_state" in raw:
            obs["observation.environment_state"] = np.asarray(raw["environment_state"], dtype=np.float32)
        return obs
