"""Replay a recorded episode's observations and score the served actions against the recorded ones.

The environment ignores the actions it is given for its dynamics (the
recording goes on regardless) but compares each one with the action recorded
at that step: :meth:`ReplayEnv.report` gives the mean and per-joint errors,
and the last step's ``info["action_error"]`` carries the same report. Useful
to check that a served checkpoint reproduces its training data, or that the
client pipeline (merging, compensation, filters) does not distort it.
:attr:`ReplayEnv.last_recorded_action` is the recorded action the latest step
was compared with (the monitor draws it next to the served one).

Sources: a simple ``.npz`` (``observation.state`` or ``state``, ``action`` or
``actions``, and ``observation.images.<cam>`` as ``(T, H, W, 3)`` uint8), or
one episode of a LeRobot dataset on disk (needs the ``[server]`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..types import Observation
from .base import Env, StepResult

__all__ = ["ReplayEnv"]


class ReplayEnv(Env):
    """Plays ``states`` / ``images`` step by step; ``actions`` are the recorded ones to compare with."""

    name = "replay"

    def __init__(
        self,
        states: np.ndarray,
        actions: np.ndarray,
        images: Mapping[str, np.ndarray] | None = None,
        fps: float = 30.0,
        task: str | None = None,
    ) -> None:
        self.states = np.asarray(states, dtype=np.float32)
        self.actions = np.asarray(actions, dtype=np.float32)
        if self.states.ndim != 2 or self.actions.ndim != 2 or len(self.states) != len(self.actions) or len(self.states) == 0:
            raise ValueError(f"need states (T, d) and actions (T, a) of the same non-zero length, got {self.states.shape} and {self.actions.shape}")
        self.images = {name: np.asarray(frames) for name, frames in (images or {}).items()}
        for name, frames in self.images.items():
            if frames.shape[0] != len(self.states) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise ValueError(f"camera {name!r}: need ({len(self.states)}, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
        self.action_dim = self.actions.shape[1]
        self.fps = fps
        self.task = task
        self._t = 0
        self._errors: list[np.ndarray] = []
        self._last_recorded: np.ndarray | None = None

    # -- loading -----------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, episode: int = 0) -> ReplayEnv:
        """An ``.npz`` file, or episode ``episode`` of the LeRobot dataset in directory ``path``."""
        path = Path(path)
        if path.is_dir():
            return cls.from_lerobot(path, episode)
        if path.suffix == ".npz":
            return cls.from_npz(path)
        raise ValueError(f"{path}: expected an .npz file or a LeRobot dataset directory")

    @classmethod
    def from_npz(cls, path: str | Path) -> ReplayEnv:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        states = _first(arrays, ("observation.state", "state", "states"), path)
        actions = _first(arrays, ("action", "actions"), path)
        images = {key.removeprefix("observation.images."): value for key, value in arrays.items() if key.startswith("observation.images.")}
        fps = float(arrays["fps"]) if "fps" in arrays else 30.0
        task = str(arrays["task"]) if "task" in arrays else None
        return cls(states, actions, images, fps=fps, task=task)

    @classmethod
    def from_lerobot(cls, root: str | Path, episode: int = 0, repo_id: str | None = None) -> ReplayEnv:
        """One episode of a LeRobot dataset stored under ``root`` (no hub access)."""
        try:
            from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
        except ImportError as exc:
            raise ImportError(f"replaying a LeRobot dataset needs the server extra: pip install 'policylink[server]' ({exc})") from None
        root = Path(root)
        if not (root / "meta" / "info.json").is_file():
            raise FileNotFoundError(f"{root} is not a LeRobot dataset (no meta/info.json)")
        repo_id = repo_id or f"local/{root.name}"
        total = LeRobotDatasetMetadata(repo_id, root=root).total_episodes
        if not 0 <= episode < total:
            raise ValueError(f"{root} has {total} episodes; episode {episode} does not exist")
        dataset = LeRobotDataset(repo_id, root=root, episodes=[episode])
        states, actions, task = [], [], None
        images: dict[str, list[np.ndarray]] = {key.removeprefix("observation.images."): [] for key in dataset.meta.camera_keys}
        for index in range(len(dataset)):
            item = dataset[index]
            states.append(item["observation.state"].numpy())
            actions.append(item["action"].numpy())
            task = task or item.get("task")
            for name in images:
                chw = item[f"observation.images.{name}"].numpy()  # float CxHxW in [0, 1]
                images[name].append((np.clip(chw.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
        return cls(np.stack(states), np.stack(actions), {name: np.stack(frames) for name, frames in images.items()}, fps=float(dataset.fps), task=task)

    # -- Env ---------------------------------------------------------------

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(self.images)

    def __len__(self) -> int:
        return len(self.states)

    @property
    def last_recorded_action(self) -> np.ndarray | None:
        """The recorded action the latest :meth:`step` compared the served one with; ``None`` since :meth:`reset`."""
        return self._last_recorded

    def reset(self, seed: int | None = None) -> Observation:
        self._t = 0
        self._errors = []
        self._last_recorded = None
        return self._observation(0)

    def step(self, action: np.ndarray) -> StepResult:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.action_dim,):
            raise ValueError(f"the recorded episode has {self.action_dim}-d actions, got shape {action.shape}")
        if self._t >= len(self):
            raise RuntimeError("the recorded episode is over; call reset()")
        self._errors.append(action - self.actions[self._t])
        self._last_recorded = self.actions[self._t]
        self._t += 1
        truncated = self._t >= len(self)
        info: dict[str, Any] = {"recorded_action": self.actions[self._t - 1]}
        if truncated:
            info["action_error"] = self.report()
        return StepResult(self._observation(min(self._t, len(self) - 1)), truncated=truncated, info=info)

    def state(self) -> np.ndarray:
        return self.states[min(self._t, len(self) - 1)].copy()

    def report(self) -> dict[str, Any]:
        """How far the applied actions were from the recorded ones so far."""
        if not self._errors:
            return {"steps": 0}
        errors = np.abs(np.stack(self._errors))
        return {
            "steps": len(errors),
            "mean_abs_error": float(errors.mean()),
            "max_abs_error": float(errors.max()),
            "rmse_per_joint": np.sqrt((errors**2).mean(axis=0)).round(6).tolist(),
        }

    def _observation(self, t: int) -> Observation:
        obs: Observation = {"observation.state": self.states[t].copy()}
        for name, frames in self.images.items():
            obs[f"observation.images.{name}"] = frames[t]
        if self.task is not None:
            obs["task"] = self.task
        return obs

    def __repr__(self) -> str:
        return f"ReplayEnv(steps={len(self)}, action_dim={self.action_dim}, cameras={list(self.images)})"


def _first(arrays: Mapping[str, np.ndarray], keys: tuple[str, ...], path: str | Path) -> np.ndarray:
    for key in keys:
        if key in arrays:
            return arrays[key]
    raise ValueError(f"{path}: no {' / '.join(repr(key) for key in keys)} array (found {sorted(arrays)})")
