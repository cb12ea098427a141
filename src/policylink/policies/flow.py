"""A built-in flow-matching policy: chunks sampled from noise, like a VLA's, with no checkpoint.

Each chunk is drawn from a Gaussian around a smooth reference trajectory (the
built-in sine trajectory at the observation's ``step``): every joint deviates
from it by a smooth random curve (squared-exponential covariance over the
chunk's steps). The policy samples the way SmolVLA and pi0 do: it starts
from fresh noise and integrates the velocity field of the flow that carries
noise to that distribution, in ``num_steps`` Euler steps from time 1 (noise)
to 0 (action), in LeRobot's convention. The field is exact for a Gaussian,
so no training is needed, and two calls for the same step give different but
equally likely chunks: consecutive chunks disagree as a VLA's do.

Real-time chunking works as on a served VLA: each denoising step goes
through LeRobot's RTC guidance (:mod:`policylink.rtc.guidance`), so a request
carrying the remainder of the current chunk gets a chunk whose first steps
follow it. Needs torch and lerobot (the ``server`` extra); fast on a CPU.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..rtc.guidance import BatchRTCProcessor, build_guidance, rtc_config
from ..rtc.request import RTC_KEY, SEED_KEY, RTCRequest, RTCSupport
from ..types import Observation, Policy, PolicyMetadata, Reply
from .builtin import FLOW_HORIZON, BuiltinPolicy, chunk_start, sine_trajectory

__all__ = ["FlowPolicy"]

#: Actions are clipped to this range (announced as the policy's action range).
ACTION_LIMIT = 1.0


class FlowPolicy(BuiltinPolicy):
    """Samples chunks by flow matching around the built-in sine trajectory; RTC-guided on request."""

    policy_type = "flow"
    description = (
        "built-in flow-matching policy: every chunk is integrated from fresh noise (a smooth random deviation "
        "around a sine trajectory), real-time-chunking guidance through LeRobot's RTC code; not a trained model"
    )
    thread_safe = True

    def __init__(self, seed: int = 0, num_steps: int = 10, spread: float = 0.15, smoothness: float = 0.25,
                 rtc: RTCSupport | None = RTCSupport(), horizon: int = FLOW_HORIZON, **kwargs: Any) -> None:
        super().__init__(action_range=(-ACTION_LIMIT, ACTION_LIMIT), horizon=horizon, **kwargs)
        if num_steps < 1 or spread <= 0 or smoothness <= 0:
            raise ValueError("num_steps, spread and smoothness must be positive")
        #: Real-time-chunking defaults; ``None``: the fields are ignored (the metadata says so).
        self.rtc = rtc.within(self.horizon) if rtc is not None else None
        self._metadata = dataclasses.replace(self._metadata, rtc=self.rtc)
        self.num_steps = num_steps
        self.trajectory = torch.from_numpy(sine_trajectory(600, self.action_dim, self._metadata.fps))
        self._posterior = _posterior_maps(self.horizon, spread, smoothness * self.horizon, num_steps)
        self._processor = BatchRTCProcessor(rtc_config(self.rtc or RTCSupport()))
        self._generator = torch.Generator().manual_seed(seed)
        self._seed = seed
        self._lock = threading.Lock()
        self._next_step = 0

    def session(self) -> FlowSession:
        return FlowSession(self)

    def reset(self) -> None:
        self._next_step = 0

    def infer(self, obs: Observation) -> Reply:
        return self.infer_batch([self], [obs])[0]

    def batch_key(self, obs: Observation) -> Any:
        return ("flow", id(self))

    def infer_batch(self, sessions: Sequence[Policy], observations: Sequence[Observation]) -> list[Reply]:
        if self.latency_s:
            time.sleep(self.latency_s)  # one simulated forward pass for the whole batch
        starts = [chunk_start(session, obs, self.horizon) for session, obs in zip(sessions, observations)]
        chunks = self.sample(starts, [obs.get(RTC_KEY) for obs in observations], [obs.get(SEED_KEY) for obs in observations])
        return [{"actions": chunk} for chunk in chunks]

    def sample(self, starts: Sequence[int], requests: Sequence[RTCRequest | None], seeds: Sequence[int | None]) -> list[np.ndarray]:
        """One chunk per row: the trajectory from ``starts[i]``, noise from ``seeds[i]`` (else fresh), guided by ``requests[i]``."""
        index = (torch.tensor(starts)[:, None] + torch.arange(self.horizon)[None, :]) % len(self.trajectory)
        mean = self.trajectory[index]  # (B, H, A)
        noise = torch.stack([self._noise(seed) for seed in seeds])
        targets = [None if request is None else torch.tensor(request.prefix) for request in requests]
        guidance = None if self.rtc is None else build_guidance(requests, targets, self.rtc, self.horizon, self.action_dim, "cpu")
        x_t, dt = noise, -1.0 / self.num_steps
        for step in range(self.num_steps):
            tau = 1.0 + step * dt

            def velocity(x: torch.Tensor, step: int = step, tau: float = tau) -> torch.Tensor:
                return self._velocity(x, mean, step, tau)

            if guidance is None:
                v_t = velocity(x_t)
            else:
                v_t = self._processor.denoise_step(x_t, None, guidance, tau, velocity)
            x_t = x_t + dt * v_t
        actions = x_t.detach().clamp(-ACTION_LIMIT, ACTION_LIMIT).numpy().astype(np.float32)
        return [np.ascontiguousarray(row) for row in actions]

    def _noise(self, seed: int | None) -> torch.Tensor:
        shape = (self.horizon, self.action_dim)
        if seed is not None:
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with self._lock:
            return torch.randn(shape, generator=self._generator)

    def _velocity(self, x: torch.Tensor, mean: torch.Tensor, step: int, tau: float) -> torch.Tensor:
        """The exact flow velocity ``E[noise - action | x]`` at time ``tau`` (1: noise, 0: action)."""
        action = mean + torch.einsum("ij,bja->bia", self._posterior[step], x - (1.0 - tau) * mean)
        noise = (x - (1.0 - tau) * action) / tau
        return noise - action


class FlowSession(Policy):
    """One client's view of a :class:`FlowPolicy`: its own position on the trajectory."""

    thread_safe = True

    def __init__(self, policy: FlowPolicy) -> None:
        self.policy = policy
        self._next_step = 0

    @property
    def metadata(self) -> PolicyMetadata:
        return self.policy.metadata

    def infer(self, obs: Observation) -> Reply:
        return self.policy.infer_batch([self], [obs])[0]

    def reset(self) -> None:
        self._next_step = 0

    def session(self) -> FlowSession:
        return FlowSession(self.policy)


def _posterior_maps(horizon: int, spread: float, length: float, num_steps: int) -> list[torch.Tensor]:
    """For each Euler step's time ``tau``: ``(1 - tau) S ((1 - tau)^2 S + tau^2 I)^-1`` with S the chunk covariance over steps.

    Applied to ``x - (1 - tau) * mean`` it gives ``E[action - mean | x]`` (one joint; joints are independent).
    """
    steps = torch.arange(horizon, dtype=torch.float64)
    covariance = spread**2 * torch.exp(-((steps[:, None] - steps[None, :]) ** 2) / (2 * length**2)) + 1e-6 * torch.eye(horizon, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(covariance)
    maps = []
    for step in range(num_steps):
        tau = 1.0 - step / num_steps
        gain = (1 - tau) * values / ((1 - tau) ** 2 * values + tau**2)
        maps.append((vectors * gain) @ vectors.T)
    return [m.float() for m in maps]

