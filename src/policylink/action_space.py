"""What a policy's actions mean, and turning them into absolute commands.

A policy declares its **action space** in its metadata: the *control space*
(``joint``: joint positions, ``ee``: end-effector pose) and the *control
type*:

``abs``
    each action is the command itself (a target position);
``relative``
    each action is an offset from the state observed when the chunk's
    observation was taken: ``command[i] = anchor + action[i]``;
``delta``
    each action is an increment over the previous step's command, the first
    one over that same observed state: ``command[i] = anchor + action[0] + ...
    + action[i]``.

Both non-absolute types are **anchored per chunk**: every chunk is turned into
absolute commands against the state in the observation it was computed from
(not the state when it arrives, nor the previous chunk's last command), so a
late chunk still means what the policy meant. Dimensions listed in
``absolute_dims`` (typically a gripper, e.g. ``-1``) are commands as they are
in every type. Every dimension is added element by element: for an ``ee``
pose with rotation angles this is exact for positions and a small-step
approximation for the angles.

The conversion runs in the client runtime before the safety filters, so the
filters, bounds and watchdog see the commands that reach the robot.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ActionSpace", "CTRL_SPACES", "CTRL_TYPES", "ANCHOR_KEYS", "CHECKPOINT_FILE", "anchor_state"]

#: Control spaces: joint positions, or an end-effector pose.
CTRL_SPACES = ("joint", "ee")
#: Control types: absolute commands, offsets from the observed state, or per-step increments.
CTRL_TYPES = ("abs", "relative", "delta")
#: Observation keys that carry the state a chunk is anchored on, in the order they are looked for.
ANCHOR_KEYS = ("observation.state", "observation/state", "state")
#: The file in a checkpoint directory that declares its action space.
CHECKPOINT_FILE = "policylink.json"


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    """A policy's action space: ``joint``/``ee`` and ``abs``/``relative``/``delta``.

    >>> space = ActionSpace.parse("ee/delta", absolute_dims=[-1])
    >>> space.to_absolute(np.array([[0.1, 0, 1], [0.1, 0, 0]]), anchor=np.array([1.0, 2.0, 0.5]))
    array([[1.1, 2. , 1. ],
           [1.2, 2. , 0. ]], dtype=float32)
    """

    ctrl_space: str = "joint"
    ctrl_type: str = "abs"
    #: Dimensions that are absolute commands whatever the type (negative indices count from the end).
    absolute_dims: tuple[int, ...] = ()
    #: Legacy clients' flag: the gripper (last dimension) is a continuous position, not open/close.
    gripper_continuous: bool = False

    def __post_init__(self) -> None:
        if self.ctrl_space not in CTRL_SPACES:
            raise ValueError(f"unknown control space {self.ctrl_space!r}: choose one of {', '.join(CTRL_SPACES)}")
        if self.ctrl_type not in CTRL_TYPES:
            raise ValueError(f"unknown control type {self.ctrl_type!r}: choose one of {', '.join(CTRL_TYPES)}")
        dims = tuple(self.absolute_dims)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"absolute_dims must be integers, got {list(dims)}")
        object.__setattr__(self, "absolute_dims", tuple(int(d) for d in dims))

    # -- names ---------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, *, absolute_dims: Iterable[int] = (), gripper_continuous: bool = False) -> ActionSpace:
        """``SPACE/TYPE``, e.g. ``joint/abs``, ``ee/delta``, ``ee/relative``."""
        space, slash, kind = str(text).strip().lower().partition("/")
        if not slash:
            raise ValueError(f"bad action space {text!r}: expected SPACE/TYPE with SPACE in {'|'.join(CTRL_SPACES)} and TYPE in {'|'.join(CTRL_TYPES)}, e.g. ee/delta")
        return cls(space, kind, tuple(absolute_dims), gripper_continuous)

    @property
    def name(self) -> str:
        return f"{self.ctrl_space}/{self.ctrl_type}"

    @property
    def absolute(self) -> bool:
        return self.ctrl_type == "abs"

    def to_dict(self) -> dict[str, Any]:
        """The metadata frame's fields."""
        return {
            "ctrl_space": self.ctrl_space, "ctrl_type": self.ctrl_type,
            "ctrl_absolute_dims": list(self.absolute_dims), "gripper_continuous": self.gripper_continuous,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActionSpace:
        """From a metadata frame (or a checkpoint's ``policylink.json``); absent fields mean ``joint/abs``."""
        return cls(
            str(data.get("ctrl_space") or "joint"), str(data.get("ctrl_type") or "abs"),
            tuple(data.get("ctrl_absolute_dims") or ()), bool(data.get("gripper_continuous", False)),
        )

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ActionSpace:
        """The action space a checkpoint declares in its ``policylink.json`` (joint/abs without one).

        The file holds the metadata frame's fields, e.g.
        ``{"ctrl_space": "ee", "ctrl_type": "delta", "ctrl_absolute_dims": [-1]}``.
        Raises ``ValueError`` naming the file when it is unreadable or wrong.
        """
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            unknown = sorted(set(data) - set(cls().to_dict()))
            if unknown:
                raise ValueError(f"unknown keys {unknown}; known: {sorted(cls().to_dict())}")
            return cls.from_dict(data)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"bad action space in {path}: {exc}") from None

    # -- conversion ----------------------------------------------------------

    def check_dims(self, action_dim: int) -> None:
        """Refuse ``absolute_dims`` outside an action of ``action_dim`` values."""
        bad = [d for d in self.absolute_dims if not -action_dim <= d < action_dim]
        if bad:
            raise ValueError(f"absolute_dims {bad} are outside an action of {action_dim} values")

    def to_absolute(self, chunk: Any, anchor: Any) -> np.ndarray:
        """The ``(horizon, dim)`` chunk as absolute commands, anchored on ``anchor`` (the observed state).

        ``abs`` chunks come back unchanged (as float32). Raises
        ``ValueError`` when the anchor is missing or does not have one value
        per action dimension.
        """
        actions = np.asarray(chunk, dtype=np.float32)
        if self.absolute:
            return actions
        if actions.ndim != 2:
            raise ValueError(f"a {self.name} chunk must be (horizon, action_dim), got shape {actions.shape}")
        dim = actions.shape[1]
        if anchor is None:
            raise ValueError(f"{self.name} actions need the observed state to anchor them, and the observation has none (looked for {', '.join(ANCHOR_KEYS)})")
        base = np.asarray(anchor, dtype=np.float32).reshape(-1)
        if base.shape != (dim,):
            raise ValueError(
                f"{self.name} actions have {dim} values but the observed state they are anchored on has {base.size}: "
                f"the state must be in the actions' space ({self.ctrl_space})"
            )
        self.check_dims(dim)
        offsets = np.cumsum(actions, axis=0) if self.ctrl_type == "delta" else actions
        commands = (base[None, :] + offsets).astype(np.float32)
        if self.absolute_dims:
            keep = list(self.absolute_dims)
            commands[:, keep] = actions[:, keep]
        return commands


def anchor_state(observation: Mapping[str, Any], keys: Sequence[str] = ANCHOR_KEYS) -> np.ndarray | None:
    """The state a chunk computed from ``observation`` is anchored on: the first of ``keys`` present."""
    for key in keys:
        value = observation.get(key)
        if value is not None:
            return np.asarray(value, dtype=np.float32).reshape(-1)
    return None
