"""Chunk execution at 30 Hz: sync vs async with each merge rule, at 100 ms and 300 ms inference delay.

Second table, real-time chunking: two policies that sample every chunk from
noise, the built-in ``flow`` policy and a small SmolVLA (random weights,
saved and loaded with LeRobot's code; the server adds a sleep so that each
request takes the given delay), run async with latest-only, LeRobot's
0.3/0.7 average and ``merge="rtc"`` (the remainder and the delay sent, the
new chunk steered by LeRobot's RTC guidance and spliced in exactly).

A real local server serves an imperfect replay of a smooth reference
trajectory: every chunk is the reference from the observation's step plus a
per-chunk offset and small per-step noise (seeded), so consecutive chunks
disagree the way a real model's do. The client runs the real executor on a
fake 6-d arm in real time. Per row: stalls, largest and mean action jump at
chunk boundaries, and the tracking error (RMSE of the executed action against
the reference at the same step, held ticks included).

    .venv/bin/python benchmarks/execution.py [--ticks 120] [--rtc-ticks 240]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from _report import write_section
from policylink import PolicyClient
from policylink.envs.fake import FakeEnv
from policylink.policies.builtin import ReplayPolicy, sine_trajectory
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.runtime.merging import LatestOnly, TemporalEnsemble, WeightedAverage
from policylink.server.background import BackgroundServer
from policylink.types import Observation, Policy, PolicyMetadata, Reply

FPS = 30.0
#: The start of each row left out of the "settled" tracking error: the arm rejoining the reference from its state.
SETTLE_S = 0.5
HORIZON = 30
ACTION_DIM = 6


class NoisyReplay(ReplayPolicy):
    """The reference from the observation's step, plus a per-chunk offset and per-step noise."""

    def __init__(self, offset_std: float = 0.03, noise_std: float = 0.005, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._rng = np.random.default_rng(0)
        self.offset_std, self.noise_std = offset_std, noise_std

    def session(self) -> NoisyReplay:
        clone = super().session()
        clone.__class__ = NoisyReplay  # the base class clones into a plain ReplayPolicy
        return clone  # type: ignore[return-value]

    def _chunk(self, obs: Observation) -> np.ndarray:
        clean = super()._chunk(obs)
        with self._lock:
            offset = self._rng.normal(0.0, self.offset_std, (1, clean.shape[1]))
            noise = self._rng.normal(0.0, self.noise_std, clean.shape)
        return (clean + offset + noise).astype(np.float32)


class Tracking:
    """Listener: the executed action against the reference at the same step."""

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = reference
        self.errors: list[np.ndarray] = []
        #: Largest per-joint change between consecutive actions of the same chunk: the chunks' own roughness.
        self.inside_steps: list[float] = []
        self._previous: tuple[int | None, np.ndarray | None] = (None, None)

    def on_step(self, event) -> None:
        if event.action is not None:  # step t's action is the one meant for the reference at t
            self.errors.append(event.action - self.reference[event.step % len(self.reference)])
        chunk, action = self._previous
        if event.fresh and chunk is not None and event.chunk_id == chunk and action is not None:
            self.inside_steps.append(float(np.max(np.abs(event.action - action))))
        self._previous = (event.chunk_id, event.action) if event.fresh else (None, None)

    def rmse(self, skip: int = 0) -> float:
        errors = self.errors[skip:]
        return float(np.sqrt(np.mean(np.square(errors)))) if errors else float("nan")


ROWS = [
    ("sync", "sync", LatestOnly()),
    ("async, latest only", "async", LatestOnly()),
    ("async, weighted average 0.3/0.7", "async", WeightedAverage(0.3)),
    ("async, temporal ensembling k=0.01", "async", TemporalEnsemble(0.01)),
]


def run_row(url: str, mode: str, merge, ticks: int, reference: np.ndarray | None, image: tuple[int, int] = (96, 128),
            use_policy_bounds: bool = True) -> dict:
    tracking = Tracking(reference if reference is not None else np.zeros((1, ACTION_DIM), np.float32))
    with PolicyClient(url) as client:
        env = FakeEnv("single", cameras=["front"], image_size=image, episode_steps=ticks, fps=FPS)
        executor = Executor(client, env, ExecutorConfig(mode=mode, fps=FPS, merge=merge, threshold=0.5), listeners=[tracking],
                            use_policy_bounds=use_policy_bounds)
        summary = executor.run(episodes=1)
        executor.close()
    summary["mean_boundary_jump"] = executor.stats.boundary_jumps.run_mean
    summary["tracking_rmse"] = tracking.rmse()
    summary["tracking_rmse_settled"] = tracking.rmse(skip=round(SETTLE_S * FPS))
    summary["max_inside_step"] = max(tracking.inside_steps, default=float("nan"))
    return summary


class Slowed(Policy):
    """A served policy whose every request takes ``latency_ms`` in all (the model's own time included)."""

    def __init__(self, policy: Policy, latency_ms: float) -> None:
        self.policy, self.latency_s = policy, latency_ms / 1e3

    @property
    def metadata(self) -> PolicyMetadata:
        return self.policy.metadata

    def session(self) -> Slowed:
        return Slowed(self.policy.session(), self.latency_s * 1e3)

    def reset(self) -> None:
        self.policy.reset()

    def infer(self, obs: Observation) -> Reply:
        started = time.perf_counter()
        reply = self.policy.infer(obs)
        time.sleep(max(0.0, self.latency_s - (time.perf_counter() - started)))
        return reply


@contextmanager
def small_smolvla() -> Iterator[Path]:
    """A small SmolVLA (random weights, tiny SmolVLM backbone built offline) saved with LeRobot's code."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot_checkpoints import build_smolvlm_backbone, features, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="policylink-bench-smolvla-") as tmp:
        backbone = build_smolvlm_backbone(Path(tmp) / "backbone")
        inputs, outputs = features(ACTION_DIM, ACTION_DIM, {"front": (32, 32)})
        config = SmolVLAConfig(
            input_features=inputs, output_features=outputs, device="cpu", vlm_model_name=str(backbone), load_vlm_weights=False,
            num_vlm_layers=2, expert_width_multiplier=0.5, chunk_size=HORIZON, n_action_steps=HORIZON, num_steps=10,
            resize_imgs_with_padding=(32, 32), tokenizer_max_length=16, max_state_dim=8, max_action_dim=8,
        )
        moments = {"mean": torch.zeros(ACTION_DIM), "std": torch.full((ACTION_DIM,), 0.2)}
        stats = {"observation.state": moments, "action": moments,
                 "observation.images.front": {"mean": torch.full((3, 1, 1), 0.4), "std": torch.full((3, 1, 1), 0.25)}}
        yield save_checkpoint(config, Path(tmp) / "checkpoint", stats)


RTC_ROWS = [
    ("async, latest only", LatestOnly()),
    ("async, weighted average 0.3/0.7", WeightedAverage(0.3)),
    ("async, RTC", "rtc"),
]


def rtc_table(ticks: int) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Rows for the flow policy and a small SmolVLA; the 300 ms jumps per policy and merge, for the target line."""
    from policylink.backends.lerobot import load_policy
    from policylink.policies.builtin import make_builtin_policy

    reference = sine_trajectory(600, ACTION_DIM, FPS)
    lines = [
        "| policy | delay | mode | stalls | stalled ticks | max boundary jump | mean boundary jump | largest step inside a chunk | tracking RMSE after 0.5 s | achieved Hz |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    at_300: dict[str, dict[str, float]] = {}
    with small_smolvla() as smolvla_dir:
        for label in ("flow", "SmolVLA"):
            for latency_ms in (100.0, 300.0):
                if label == "flow":
                    policy: Policy = make_builtin_policy("flow", action_dim=ACTION_DIM, horizon=HORIZON, latency_ms=latency_ms)
                else:
                    policy = Slowed(load_policy(smolvla_dir, device="cpu"), latency_ms)
                with BackgroundServer(policy, host="127.0.0.1") as server:
                    for name, merge in RTC_ROWS:
                        s = run_row(server.url, "async", merge, ticks, reference if label == "flow" else None, image=(32, 32),
                                    use_policy_bounds=label == "flow")
                        tracking = f"{s['tracking_rmse_settled']:.4f}" if label == "flow" else "n/a"
                        line = (f"| {label} | {latency_ms:.0f} ms | {name} | {s['stalls']} | {100 * s['stall_fraction']:.1f}% | "
                                f"{s['max_boundary_jump']:.4f} | {s['mean_boundary_jump']:.4f} | {s['max_inside_step']:.4f} | {tracking} | "
                                f"{s['fps_achieved']:.1f} |")
                        print(line, flush=True)
                        lines.append(line)
                        if latency_ms == 300.0:
                            at_300.setdefault(label, {})[name] = s
    return lines, at_300


def rtc_verdict(at_300: dict[str, dict[str, Any]]) -> list[str]:
    """The target: at 300 ms, zero stalls and a largest boundary jump at most half of the 0.3/0.7 average's."""
    verdicts = []
    for label, rows in at_300.items():
        rtc, average = rows["async, RTC"], rows["async, weighted average 0.3/0.7"]
        ratio = rtc["max_boundary_jump"] / average["max_boundary_jump"] if average["max_boundary_jump"] else float("nan")
        met = rtc["stalls"] == 0 and ratio <= 0.5
        verdicts.append(f"- {label}, 300 ms: {rtc['stalls']} stalls, largest jump {rtc['max_boundary_jump']:.4f} = {ratio:.2f} x the "
                        f"average's {average['max_boundary_jump']:.4f} (target: 0 stalls and <= 0.5 x): **{'met' if met else 'missed'}**")
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=120, help="control ticks per row (default: 120, 4 s at 30 Hz)")
    parser.add_argument("--rtc-ticks", type=int, default=240, help="control ticks per real-time-chunking row (default: 240, 8 s)")
    parser.add_argument("--no-rtc", action="store_true", help="skip the real-time-chunking table (it needs the server extra)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    reference = sine_trajectory(600, ACTION_DIM, FPS)
    natural_step = float(np.max(np.abs(np.diff(reference, axis=0))))
    lines = [
        "| delay | mode | stalls | stalled ticks | max boundary jump | mean boundary jump | tracking RMSE | tracking RMSE after 0.5 s | achieved Hz |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for latency_ms in (100.0, 300.0):
        policy = NoisyReplay(actions=reference, horizon=HORIZON, cameras={"front": (96, 128)}, latency_ms=latency_ms)
        with BackgroundServer(policy, host="127.0.0.1") as server:
            for name, mode, merge in ROWS:
                s = run_row(server.url, mode, merge, args.ticks, reference)
                line = (
                    f"| {latency_ms:.0f} ms | {name} | {s['stalls']} | {100 * s['stall_fraction']:.1f}% | {s['max_boundary_jump']:.4f} | "
                    f"{s['mean_boundary_jump']:.4f} | {s['tracking_rmse']:.4f} | {s['tracking_rmse_settled']:.4f} | {s['fps_achieved']:.1f} |"
                )
                print(line, flush=True)
                lines.append(line)
    notes = f"""
Control loop at {FPS:g} Hz on a fake 6-d arm, {args.ticks} ticks per row; chunks of {HORIZON} actions from a real
local server (WebSocket on 127.0.0.1) whose built-in replay policy sleeps the given delay per request and adds a
per-chunk offset (std 0.03) and per-step noise (std 0.005) to a smooth reference (sine per joint, amplitude 0.5;
its own largest per-step change is {natural_step:.4f}). All rows compensate latency (elapsed actions dropped);
async requests the next chunk when half a chunk is left (or earlier, from the recent latency estimate).
A *stall* is a run of ticks where the queue was empty and the arm held its last command; the episode's first chunk
is awaited before the first tick. Boundary jump: largest (mean) per-joint change between the last action of one
chunk and the first executed action of the next (before the filters and the resume ramp). Tracking RMSE: executed
action against the reference at the same step, held ticks included; the whole row includes the start of the episode,
where the arm rejoins the reference from its own state in bounded steps (the executor's resume ramp: never a jump),
and the last column leaves out that first {SETTLE_S:g} s.
"""
    table = "\n".join(lines) + "\n" + notes
    if not args.no_rtc:
        rtc_lines, at_300 = rtc_table(args.rtc_ticks)
        table += "\n### Real-time chunking\n\n" + "\n".join(rtc_lines) + "\n\n" + "\n".join(rtc_verdict(at_300)) + "\n" + f"""
{args.rtc_ticks} ticks per row at {FPS:g} Hz, chunks of {HORIZON}, both policies sample each chunk from fresh noise, so
consecutive chunks disagree. `flow`: the built-in flow-matching policy (smooth random deviations, std 0.15, around the sine
reference; 10 Euler steps); its tracking error is against that reference. SmolVLA: a small one (2 VLM layers, 10 flow
steps, random weights, action statistics mean 0 / std 0.2) saved and loaded with LeRobot's code, on this CPU, with a
sleep making every request take the given delay; it has no reference to track, and its random-weight chunks leave
the made-up statistics' range, so only the arm's joint ranges bound it here. RTC: each request carries the unexecuted
remainder, the delay estimated from the recent round trips (in ticks) and the whole remainder as execution horizon;
the server's defaults (guidance weight 10, linear schedule); the new chunk is spliced in at the step it arrives.
"Largest step inside a chunk": the largest per-joint change between two consecutive executed actions of one chunk,
the chunks' own roughness. A spliced join can be no smoother than the chunk it continues: the random-weight SmolVLA's
chunks are rough (an untrained action expert maps each step's noise to an unrelated action), so its RTC joins are as
large as its ordinary steps while the flow policy's are as small as its own.
"""
    if not args.no_write:
        write_section("Chunk execution", table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
