"""Client-side environments: fake, replay, simulators, real robots."""

from .base import Env, StepResult
from .fake import FakeEnv
from .replay import ReplayEnv

__all__ = ["Env", "StepResult", "FakeEnv", "ReplayEnv"]
