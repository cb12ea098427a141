"""Client-side environments: fake, replay, simulators, real robots."""

from .base import Env, StepResult

__all__ = ["Env", "StepResult"]
