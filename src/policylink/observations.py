"""Helpers to build observations that match a policy's announced inputs."""

from __future__ import annotations

import numpy as np

from .types import Observation, PolicyMetadata

__all__ = ["example_observation"]


def example_observation(metadata: PolicyMetadata, seed: int = 0, task: str | None = None) -> Observation:
    """A random observation with every input the policy announced, in the announced shape and dtype.

    Images (uint8 features) get random pixels, float features small random values.
    """
    rng = np.random.default_rng(seed)
    obs: Observation = {}
    for key, feature in metadata.input_features.items():
        dtype = np.dtype(feature.dtype)
        if dtype == np.uint8:
            obs[key] = rng.integers(0, 256, feature.shape, dtype=np.uint8)
        else:
            obs[key] = rng.uniform(-0.1, 0.1, feature.shape).astype(dtype)
    if task is not None:
        obs["task"] = task
    return obs
