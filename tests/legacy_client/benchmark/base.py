"""The data classes a legacy MetaObs / MetaAction client defines in its own package.

Written for the tests the way such clients write them (plain dataclasses,
numpy fields); policylink never imports this module: the server names these
classes in pickles and the client's own unpickler resolves them here.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class MetaAction:
    ctrl_space: str = "ee"  # "ee" or "joint"
    ctrl_type: str = "delta"  # "abs", "relative" or "delta"
    action: np.ndarray = None  # action[-1]: the gripper
    gripper_continuous: bool = False

    def __getitem__(self, key):
        return getattr(self, key)


@dataclass
class MetaObs:
    state: np.ndarray = None
    state_ee: np.ndarray = None
    state_joint: np.ndarray = None
    state_obj: np.ndarray = None
    image: np.ndarray = None  # (K, C, H, W)
    depth: np.ndarray = None  # (K, H, W)
    pc: np.ndarray = None  # (n, 3)
    raw_lang: str = ""
    timestep: int = -1

    def to_batch(self):
        for key in ("state", "state_ee", "state_joint", "state_obj", "image", "depth", "pc"):
            value = getattr(self, key)
            if isinstance(value, np.ndarray):
                setattr(self, key, value[np.newaxis])
