"""A fake robot: observations of the right shapes, no hardware, fully deterministic.

The arm's joints follow the commanded positions with a first-order lag, so a
plot of state against action looks like a real position-controlled arm; the
cameras show a seeded picture with a bar that moves with the first joint, so
a monitor shows motion. The same seed gives the same episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..types import Observation, PolicyMetadata
from .base import Env, StepResult

__all__ = ["FakeEnv", "LAYOUTS"]

#: Layout name -> (state/action dimension, default cameras).
LAYOUTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "single": (6, ("front",)),
    "bimanual": (12, ("top",)),
}


class FakeEnv(Env):
    """A single-arm (6-d) or bimanual (12-d) arm with 0 to 3 cameras.

    ``cameras`` names the cameras (default: the layout's one camera),
    ``image_size`` is (height, width) for every camera, ``episode_steps``
    truncates each episode, ``lag`` is how much of the gap to the command the
    joints close per step (1.0: they jump to it).
    """

    name = "fake"

    def __init__(
        self,
        layout: str = "single",
        cameras: Sequence[str] | None = None,
        image_size: tuple[int, int] = (480, 640),
        episode_steps: int = 300,
        fps: float = 30.0,
        lag: float = 0.5,
        seed: int = 0,
        task: str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown fake layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        dim, default_cameras = LAYOUTS[layout]
        self.layout = layout
        self.action_dim = dim
        self._cameras = tuple(default_cameras if cameras is None else cameras)
        if len(self._cameras) > 3 or len(set(self._cameras)) != len(self._cameras):
            raise ValueError(f"the fake environment has 0 to 3 distinct cameras, got {list(self._cameras)}")
        height, width = image_size
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {image_size}")
        if episode_steps < 1 or not 0.0 < lag <= 1.0:
            raise ValueError(f"need episode_steps >= 1 and 0 < lag <= 1, got {episode_steps}, {lag}")
        self.image_size = (height, width)
        self.episode_steps = episode_steps
        self.fps = fps
        self.lag = lag
        self.task = task
        self._seed = seed
        self._state = np.zeros(dim, np.float32)
        self._steps = 0
        self._backgrounds: dict[str, np.ndarray] = {}

    @classmethod
    def for_metadata(cls, metadata: PolicyMetadata, **options: object) -> FakeEnv:
        """A fake whose state, cameras and image size match what a policy announced."""
        state = metadata.input_features.get("observation.state")
        dim = state.shape[0] if state is not None else metadata.action_dim
        layout = {6: "single", 12: "bimanual"}.get(dim)
        if layout is None:
            raise ValueError(f"no fake layout has a {dim}-d state; layouts: single (6), bimanual (12)")
        size = metadata.image_resolution or (480, 640)
        return cls(layout, cameras=metadata.camera_names, image_size=size, **options)  # type: ignore[arg-type]

    @property
    def camera_names(self) -> tuple[str, ...]:
        return self._cameras

    def reset(self, seed: int | None = None) -> Observation:
        rng = np.random.default_rng(self._seed if seed is None else seed)
        self._state = rng.uniform(-0.1, 0.1, self.action_dim).astype(np.float32)
        self._steps = 0
        height, width = self.image_size
        # One seeded picture per camera; each frame is a copy with a moving bar drawn on it.
        self._backgrounds = {name: rng.integers(0, 120, (height, width, 3), dtype=np.uint8) for name in self._cameras}
        return self._observation()

    def step(self, action: np.ndarray) -> StepResult:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.action_dim,):
            raise ValueError(f"the {self.layout} fake arm takes {self.action_dim} values per action, got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action has non-finite values")
        self._state = (self._state + self.lag * (action - self._state)).astype(np.float32)
        self._steps += 1
        truncated = self._steps >= self.episode_steps
        return StepResult(self._observation(), truncated=truncated, info={"steps": self._steps})

    def state(self) -> np.ndarray:
        return self._state.copy()

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Like a revolute arm's joints: ``[-pi, pi]`` each."""
        return np.full(self.action_dim, -np.pi, np.float32), np.full(self.action_dim, np.pi, np.float32)

    def _observation(self) -> Observation:
        obs: Observation = {"observation.state": self._state.copy()}
        width = self.image_size[1]
        column = int((np.tanh(self._state[0]) * 0.5 + 0.5) * (width - 1))
        bar = max(1, width // 32)
        for index, (name, background) in enumerate(self._backgrounds.items()):
            frame = background.copy()
            frame[:, column : column + bar, index % 3] = 255
            obs[f"observation.images.{name}"] = frame
        if self.task is not None:
            obs["task"] = self.task
        return obs

    def __repr__(self) -> str:
        return f"FakeEnv(layout={self.layout!r}, cameras={list(self._cameras)}, image_size={self.image_size})"
