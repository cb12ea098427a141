"""MetaWorld (``metaworld``): one of its 50 Sawyer-arm manipulation tasks in MuJoCo, 4-d actions.

``--env metaworld/<task>`` (``metaworld/reach-v3``, ``metaworld/pick-place-v3``...) is
MetaWorld's ``Meta-World/MT1`` environment for that task. Observations, in LeRobot's keys
(``lerobot.envs.configs.MetaworldEnv`` reads the state the same way):

- ``observation.state``: the hand position ``(x, y, z)`` and the gripper opening, float32
  ``(4,)`` (the first 4 values of the simulator's observation);
- ``observation.environment_state``: the simulator's whole observation, float32 ``(39,)``:
  hand and gripper (4), the objects' positions and quaternions (14), the same 18 values one
  step earlier, the goal position (3);
- ``observation.images.<camera>``: the ``camera`` view (``corner2`` by default), ``HxWx3``
  uint8, 480x480 by default (``image_size``).

Actions are ``(4,)`` in ``[-1, 1]``: the hand's displacement along x, y, z (MetaWorld moves
it at most 1 cm a step) and the gripper's target (-1 open, 1 closed). The reward is the
simulator's (0 to 10); success is its ``info["success"]``, which also ends the episode, as
MetaWorld's own evaluation does. Otherwise an episode is cut at ``max_episode_steps``
(default and maximum: MetaWorld's 500-step ``max_path_length``).

Seeds: MT1 fixes 50 variations of the task (object and goal positions), drawn from
``benchmark_seed``. MetaWorld ignores the ``seed`` of ``reset``; here a reset with a seed
first seeds the environment's generator (MetaWorld's ``seed()``), from which MT1 picks the
episode's variation, so the same seed always starts the same episode.

MetaWorld's corner cameras are mounted upside down: their image's "up" points at the floor.
A frame from a camera whose up axis points below the horizon is turned 180 degrees, so every
view shows the scene upright (LeRobot does the same for ``corner2``).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...types import Observation
from ..base import StepResult
from .gym_env import GymEnv

__all__ = ["MetaWorldEnv", "metaworld_tasks"]

# Building MT1 draws the task's variations from NumPy's global generator (seeded, then
# restored): environments built in parallel threads would interleave those draws.
_BUILD_LOCK = threading.Lock()


def metaworld_tasks() -> list[str]:
    """MetaWorld's task names (``reach-v3``...), from the installed package."""
    return sorted(_import_metaworld().env_dict.ALL_V3_ENVIRONMENTS)


class MetaWorldEnv(GymEnv):
    """One MetaWorld task (``reach-v3``, ``pick-place-v3``...) on the :class:`~policylink.envs.Env` interface."""

    gym_id = "Meta-World/MT1"
    gym_module = "metaworld"
    package = "metaworld"
    default_max_steps = 500
    #: Actions are end-effector displacements: the control loop ramps no command from a state.
    position_actions = False

    def __init__(
        self,
        task: str = "reach-v3",
        camera: str = "corner2",
        image_size: tuple[int, int] = (480, 480),
        max_episode_steps: int | None = None,
        benchmark_seed: int = 0,
        **gym_options: Any,
    ) -> None:
        classes = _import_metaworld().env_dict.ALL_V3_ENVIRONMENTS
        if task not in classes:
            raise ValueError(f"unknown MetaWorld task {task!r}; choose one of {', '.join(metaworld_tasks())}")
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"MetaWorld image_size is (height, width) in pixels, got {tuple(image_size)}")
        limit = int(classes[task].max_path_length)
        if max_episode_steps is not None and not 0 < max_episode_steps <= limit:
            raise ValueError(f"MetaWorld episodes last 1 to {limit} steps (its max_path_length), got {max_episode_steps}")
        self.task = task
        self.name = f"metaworld/{task}"
        self.camera = camera
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.benchmark_seed = int(benchmark_seed)
        #: The last observation's frame (the scene has not moved since).
        self._frame: np.ndarray | None = None
        with _BUILD_LOCK:
            super().__init__(max_episode_steps or limit, **gym_options)
        sim = self._env.unwrapped
        # 5 physics steps of 2.5 ms: 80 steps a second.
        self.fps = 1.0 / float(sim.dt)
        cameras = [sim.model.camera(i).name for i in range(sim.model.ncam)]
        if camera not in cameras:
            self.close()
            raise ValueError(f"unknown MetaWorld camera {camera!r}; choose one of {', '.join(cameras)}")
        self._camera_id = cameras.index(camera)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return (self.camera,)

    def gym_options(self) -> dict[str, Any]:
        height, width = self.image_size
        return {
            "env_name": self.task, "seed": self.benchmark_seed, "terminate_on_success": True,
            "render_mode": "rgb_array", "camera_name": self.camera, "height": height, "width": width,
        }

    def reset(self, seed: int | None = None) -> Observation:
        if seed is not None:
            self._env.unwrapped.seed(int(seed))
        return super().reset(seed)

    def step(self, action: np.ndarray) -> StepResult:
        result = super().step(action)
        # MetaWorld says "success" (1.0 or 0.0), not gymnasium's "is_success".
        result.success = bool(result.info.get("success", 0.0))
        return result

    def map_observation(self, raw: Any) -> Observation:
        vector = np.asarray(raw, dtype=np.float32)
        self._frame = self._render_camera()
        return {
            "observation.state": vector[:4].copy(),
            "observation.environment_state": vector,
            f"observation.images.{self.camera}": self._frame,
        }

    def render(self) -> np.ndarray:
        """The camera's current frame, upright (``HxWx3`` uint8): the observation's image, for videos."""
        return self._frame if self._frame is not None else self._render_camera()

    def _render_camera(self) -> np.ndarray:
        frame = np.asarray(self._env.render(), dtype=np.uint8)
        # The z component of the camera's y (image up) axis, in the world frame.
        if self._env.unwrapped.data.cam_xmat[self._camera_id][7] < 0:
            frame = frame[::-1, ::-1]
        return np.ascontiguousarray(frame)


def _import_metaworld() -> Any:
    try:
        import metaworld
    except ImportError as exc:
        raise ImportError(f"the MetaWorld simulators need metaworld: pip install 'policylink[sim]' ({exc})") from None
    return metaworld
