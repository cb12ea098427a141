"""A fake robot: observations of the right shapes, no hardware, fully deterministic.

The arm's joints follow the commanded positions with a first-order lag, so a
plot of state against action looks like a real position-controlled arm; the
cameras show a seeded picture with a bar that moves with the first joint, so
a monitor shows motion. The same seed gives the same episode.

Two ways to shape it: a layout (``single``: 6-d, ``bimanual``: 12-d) with
cameras of your choosing, or a task preset (:data:`PRESETS`: the seeds'
grasp-cube tasks ``lift``, ``sort``, ``stack``) that fixes the layout, the
three cameras, their size and the language instruction. Observations use
LeRobot's keys, or openpi's with ``keys="openpi"`` (:func:`image_keys`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..types import Observation, PolicyMetadata
from .base import Env, StepResult

__all__ = ["FakeEnv", "LAYOUTS", "PRESETS", "Preset", "KEY_STYLES", "image_keys"]

#: Layout name -> (state/action dimension, default cameras).
LAYOUTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "single": (6, ("front",)),
    "bimanual": (12, ("top",)),
}

#: The seeds' cameras: one in front of the table, one on each wrist.
SEED_CAMERAS = ("front", "left_wrist", "right_wrist")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One of the seeds' grasp-cube tasks as the fake plays it: arm layout, cameras, image size (HxW), instruction."""

    layout: str
    instruction: str
    cameras: tuple[str, ...] = SEED_CAMERAS
    image_size: tuple[int, int] = (480, 640)

    @property
    def dim(self) -> int:
        """The state and action dimension of the preset's layout."""
        return LAYOUTS[self.layout][0]


#: Task preset name -> what it fixes. lift and stack: one arm; sort: two.
PRESETS: dict[str, Preset] = {
    "lift": Preset("single", "lift the cube"),
    "sort": Preset("bimanual", "sort the cubes"),
    "stack": Preset("single", "stack the cubes"),
}

#: Key style -> (state key, language-instruction key). Images: :func:`image_keys`.
KEY_STYLES: dict[str, tuple[str, str]] = {
    "lerobot": ("observation.state", "task"),
    "openpi": ("observation/state", "prompt"),
}


def image_keys(cameras: Sequence[str], keys: str = "lerobot") -> dict[str, str]:
    """Camera name -> the observation key its frames appear under.

    ``lerobot``: ``observation.images.<camera>``. ``openpi``: the first
    camera is ``observation/image``, every other one
    ``observation/<camera>_image``; cameras ``("front", "wrist")`` give
    exactly openpi's LIBERO keys (``observation/image``,
    ``observation/wrist_image``), and a policylink server maps each key back
    to the camera of that name (:mod:`policylink.backends.obsmap`).
    """
    if keys not in KEY_STYLES:
        raise ValueError(f"unknown observation key style {keys!r}; choose one of {sorted(KEY_STYLES)} (CLI: --env.keys)")
    if keys == "lerobot":
        return {name: f"observation.images.{name}" for name in cameras}
    return {name: "observation/image" if index == 0 else f"observation/{name}_image" for index, name in enumerate(cameras)}


class FakeEnv(Env):
    """A single-arm (6-d) or bimanual (12-d) arm with 0 to 3 cameras.

    ``layout`` is ``single`` (the default) or ``bimanual``; ``cameras`` names
    the cameras (default: the layout's one camera), ``image_size`` is
    (height, width) for every camera (default: 480x640), ``episode_steps``
    truncates each episode, ``lag`` is how much of the gap to the command the
    joints close per step (1.0: they jump to it). ``task`` is the language
    instruction sent with every observation (none by default).

    ``preset`` (a key of :data:`PRESETS`) takes the layout, cameras, image
    size and instruction from one of the seeds' grasp-cube tasks. Explicit
    arguments may only refine it: ``cameras`` chooses among the preset's
    cameras, ``image_size`` and ``task`` replace its size and instruction,
    and a ``layout`` other than the preset's is refused.

    ``keys`` is ``lerobot`` (``observation.state``,
    ``observation.images.<camera>``, ``task``) or ``openpi``
    (``observation/state``, ``observation/image`` and
    ``observation/<camera>_image``, ``prompt``; see :func:`image_keys`).
    Only the keys differ: values, :meth:`state` and stepping are the same.
    """

    name = "fake"

    def __init__(
        self,
        layout: str | None = None,
        cameras: Sequence[str] | None = None,
        image_size: tuple[int, int] | None = None,
        episode_steps: int = 300,
        fps: float = 30.0,
        lag: float = 0.5,
        seed: int = 0,
        task: str | None = None,
        preset: str | None = None,
        keys: str = "lerobot",
    ) -> None:
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"unknown fake layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        chosen = _preset(preset)
        if chosen is not None:
            _check_refinement(str(preset), chosen, layout, cameras)
            layout = chosen.layout
            cameras = chosen.cameras if cameras is None else cameras
            image_size = chosen.image_size if image_size is None else image_size
            task = chosen.instruction if task is None else task
        layout = layout or "single"
        dim, default_cameras = LAYOUTS[layout]
        self.preset = preset
        self.layout = layout
        self.action_dim = dim
        self._cameras = tuple(default_cameras if cameras is None else cameras)
        if len(self._cameras) > 3 or len(set(self._cameras)) != len(self._cameras):
            raise ValueError(f"the fake environment has 0 to 3 distinct cameras, got {list(self._cameras)}")
        height, width = (480, 640) if image_size is None else image_size
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {image_size}")
        if episode_steps < 1 or not 0.0 < lag <= 1.0:
            raise ValueError(f"need episode_steps >= 1 and 0 < lag <= 1, got {episode_steps}, {lag}")
        self.keys = keys
        self._image_keys = image_keys(self._cameras, keys)
        self._state_key, self._task_key = KEY_STYLES[keys]
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

    @property
    def image_keys(self) -> dict[str, str]:
        """Camera name -> the observation key of its frames (``observation.images.front``, ``observation/image``...)."""
        return dict(self._image_keys)

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
        obs: Observation = {self._state_key: self._state.copy()}
        width = self.image_size[1]
        column = int((np.tanh(self._state[0]) * 0.5 + 0.5) * (width - 1))
        bar = max(1, width // 32)
        for index, (name, background) in enumerate(self._backgrounds.items()):
            frame = background.copy()
            frame[:, column : column + bar, index % 3] = 255
            obs[self._image_keys[name]] = frame
        if self.task is not None:
            obs[self._task_key] = self.task
        return obs

    def __repr__(self) -> str:
        preset = f"preset={self.preset!r}, " if self.preset is not None else ""
        keys = f", keys={self.keys!r}" if self.keys != "lerobot" else ""
        return f"FakeEnv({preset}layout={self.layout!r}, cameras={list(self._cameras)}, image_size={self.image_size}{keys})"


def _preset(name: str | None) -> Preset | None:
    if name is None:
        return None
    if name not in PRESETS:
        raise ValueError(f"unknown fake task preset {name!r}; choose one of {sorted(PRESETS)} (CLI: --env.task)")
    return PRESETS[name]


def _check_refinement(name: str, preset: Preset, layout: str | None, cameras: Sequence[str] | None) -> None:
    """Refuse a layout or cameras that contradict the preset (each error names the CLI flags too)."""
    if layout is not None and layout != preset.layout:
        fitting = ", ".join(sorted(other for other, spec in PRESETS.items() if spec.layout == layout))
        raise ValueError(
            f"fake task preset {name!r} is a {preset.layout} ({preset.dim}-d) task, but layout {layout!r} was asked for "
            f"(CLI: --env.task {name} contradicts --env.layout {layout}); drop the layout, or choose a task whose layout is {layout}: {fitting}"
        )
    foreign = [camera for camera in cameras or () if camera not in preset.cameras]
    if foreign:
        raise ValueError(
            f"fake task preset {name!r} has the cameras {list(preset.cameras)}, not {foreign} "
            f"(CLI: --env.cameras can only choose among --env.task {name}'s cameras); drop the cameras or pick among those"
        )
