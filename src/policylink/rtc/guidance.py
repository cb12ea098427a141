"""Real-time-chunking guidance for a batch of clients, on LeRobot's RTC code (server side: torch, lerobot).

LeRobot's :class:`~lerobot.policies.rtc.modeling_rtc.RTCProcessor` steers one
flow-matching denoising step towards a previous chunk's remainder, with one
delay, horizon, weight and schedule for the whole batch. A served batch
mixes clients with their own remainders and delays, so :class:`BatchRTCProcessor`
hands a batch of one (or a batch whose clients all ask the same) to LeRobot's
``denoise_step`` unchanged, and otherwise applies the same guidance with
per-sample prefix weights (built by LeRobot's own ``get_prefix_weights``) and
per-sample weight caps. Both give each client what it would get alone.

Note on LeRobot 0.4.4: its ``denoise_step`` evaluates the denoiser before
``x_t`` requires a gradient, so the correction is the weighted error itself
(the denoiser's Jacobian is taken as the identity): guidance costs one cheap
autograd call, not a backward pass through the model. The per-sample path
keeps exactly that behaviour, so batched and lone requests agree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lerobot.configs.types import RTCAttentionSchedule
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.policies.rtc.modeling_rtc import RTCProcessor

from .request import RTCRequest, RTCSupport

__all__ = ["BatchRTCProcessor", "BatchGuidance", "rtc_config", "build_guidance", "install"]


def rtc_config(support: RTCSupport) -> RTCConfig:
    """LeRobot's RTC configuration for a server's defaults."""
    return RTCConfig(
        enabled=True, prefix_attention_schedule=RTCAttentionSchedule(support.schedule.upper()),
        max_guidance_weight=support.guidance, execution_horizon=support.execution_horizon,
    )


@dataclasses.dataclass
class BatchGuidance:
    """Per-sample guidance for one batch, in the model's (normalised, padded) action space.

    Passed to ``predict_action_chunk`` as ``inference_delay``; samples without
    RTC fields have zero weights (their flow is not steered).
    """

    #: (B, T, A) target remainders, zero-padded.
    prefix: torch.Tensor
    #: (B, T, 1) prefix weights.
    weights: torch.Tensor
    #: (B, 1, 1) cap on each sample's guidance weight.
    max_guidance: torch.Tensor
    #: When every sample asks the same: LeRobot's own scalar arguments (delay, horizon, guidance, schedule).
    uniform: tuple[int, int, float, str] | None = None


@functools.lru_cache(maxsize=512)
def _prefix_weights(schedule: str, delay: int, horizon: int, total: int) -> torch.Tensor:
    processor = RTCProcessor(RTCConfig(prefix_attention_schedule=RTCAttentionSchedule(schedule.upper())))
    return processor.get_prefix_weights(delay, horizon, total)


def build_guidance(
    requests: Sequence[RTCRequest | None], normalized_prefixes: Sequence[torch.Tensor | None], support: RTCSupport,
    chunk_size: int, action_dim: int, device: Any,
) -> BatchGuidance | None:
    """Guidance for a batch: ``requests[i]`` with its prefix already in model space; ``None`` if nobody asked."""
    if all(request is None for request in requests):
        return None
    batch = len(requests)
    prefix = torch.zeros(batch, chunk_size, action_dim)
    weights = torch.zeros(batch, chunk_size, 1)
    caps = torch.ones(batch, 1, 1)
    asked: set[tuple[int, int, float, str, int]] = set()
    for row, (request, target) in enumerate(zip(requests, normalized_prefixes)):
        if request is None or target is None:
            asked.add((-1, -1, 0.0, "", -1))
            continue
        guidance, schedule, horizon = request.resolved(support)
        steps, width = min(len(target), chunk_size), min(target.shape[-1], action_dim)
        prefix[row, :steps, :width] = target[:steps, :width].float().cpu()
        weights[row, :, 0] = _prefix_weights(schedule, request.delay, horizon, chunk_size)
        caps[row] = guidance
        asked.add((request.delay, horizon, guidance, schedule, len(target)))
    uniform = None
    if len(asked) == 1:
        delay, horizon, guidance, schedule, _ = next(iter(asked))
        uniform = (delay, horizon, guidance, schedule) if delay >= 0 else None
    return BatchGuidance(prefix.to(device), weights.to(device), caps.to(device), uniform)


class BatchRTCProcessor(RTCProcessor):
    """LeRobot's RTC processor, taking a :class:`BatchGuidance` as ``inference_delay``.

    Install it on a LeRobot flow-matching policy with :func:`install`; calls
    with LeRobot's own scalar arguments still work as before.
    """

    def denoise_step(self, x_t: torch.Tensor, prev_chunk_left_over: Any, inference_delay: Any, time: Any,
                     original_denoise_step_partial: Callable[[torch.Tensor], torch.Tensor], execution_horizon: Any = None) -> torch.Tensor:
        if not isinstance(inference_delay, BatchGuidance):
            return super().denoise_step(x_t, prev_chunk_left_over, inference_delay, time, original_denoise_step_partial, execution_horizon)
        guidance = inference_delay
        if guidance.uniform is not None:
            return self._uniform_step(x_t, guidance, time, original_denoise_step_partial)
        return self._per_sample_step(x_t, guidance, time, original_denoise_step_partial)

    def _uniform_step(self, x_t: torch.Tensor, guidance: BatchGuidance, time: Any, denoise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Every sample asks the same: LeRobot's own step, with that sample's weight cap and schedule."""
        assert guidance.uniform is not None
        delay, horizon, cap, schedule = guidance.uniform
        # A processor of its own per call: concurrent batches must not share a mutated configuration.
        config = dataclasses.replace(self.rtc_config, max_guidance_weight=cap, prefix_attention_schedule=RTCAttentionSchedule(schedule.upper()))
        return RTCProcessor(config).denoise_step(x_t, guidance.prefix, delay, time, denoise, horizon)

    def _per_sample_step(self, x_t: torch.Tensor, guidance: BatchGuidance, time: Any, denoise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """LeRobot's guidance with each sample's prefix weights and weight cap (same order of operations)."""
        x_t = x_t.clone().detach()
        tau = torch.as_tensor(1 - time, dtype=torch.float32)
        with torch.enable_grad():
            v_t = denoise(x_t)
            x_t.requires_grad_(True)
            x1_t = x_t - time * v_t
            err = (guidance.prefix - x1_t) * guidance.weights
            correction = torch.autograd.grad(x1_t, x_t, err.clone().detach(), retain_graph=False)[0]
        caps = guidance.max_guidance.to(x_t.dtype)
        squared_one_minus_tau = (1 - tau) ** 2
        inv_r2 = (squared_one_minus_tau + tau**2) / squared_one_minus_tau
        # As LeRobot: infinite at the first step (capped), 0 where 0 * inf gives NaN at the last.
        weight = torch.nan_to_num((1 - tau) / tau * inv_r2, nan=0.0)
        weight = torch.minimum(weight.to(x_t.device), caps)
        return v_t - weight * correction


def install(model: Any, support: RTCSupport) -> BatchRTCProcessor:
    """Turn RTC on for a loaded LeRobot flow-matching policy (SmolVLA, pi0, pi0.5) with a batch-aware processor."""
    model.config.rtc_config = rtc_config(support)
    processor = BatchRTCProcessor(model.config.rtc_config)
    model.rtc_processor = processor
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rtc_processor"):
        inner.rtc_processor = processor
    return processor
