"""Chunk execution at 30 Hz: sync vs async with each merge rule, at 100 ms and 300 ms inference delay.

A real local server serves an imperfect replay of a smooth reference
trajectory: every chunk is the reference from the observation's step plus a
per-chunk offset and small per-step noise (seeded), so consecutive chunks
disagree the way a real model's do. The client runs the real executor on a
fake 6-d arm in real time. Per row: stalls, largest and mean action jump at
chunk boundaries, and the tracking error (RMSE of the executed action against
the reference at the same step, held ticks included).

    .venv/bin/python benchmarks/execution.py [--ticks 120]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from _report import write_section
from policylink import PolicyClient
from policylink.envs.fake import FakeEnv
from policylink.policies.builtin import ReplayPolicy, sine_trajectory
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.runtime.merging import LatestOnly, TemporalEnsemble, WeightedAverage
from policylink.server.background import BackgroundServer
from policylink.types import Observation

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

    def on_step(self, event) -> None:
        if event.action is not None:  # step t's action is the one meant for the reference at t
            self.errors.append(event.action - self.reference[event.step % len(self.reference)])

    def rmse(self, skip: int = 0) -> float:
        errors = self.errors[skip:]
        return float(np.sqrt(np.mean(np.square(errors)))) if errors else float("nan")


ROWS = [
    ("sync", "sync", LatestOnly()),
    ("async, latest only", "async", LatestOnly()),
    ("async, weighted average 0.3/0.7", "async", WeightedAverage(0.3)),
    ("async, temporal ensembling k=0.01", "async", TemporalEnsemble(0.01)),
]


def run_row(url: str, mode: str, merge, ticks: int, reference: np.ndarray) -> dict:
    tracking = Tracking(reference)
    with PolicyClient(url) as client:
        env = FakeEnv("single", cameras=["front"], image_size=(96, 128), episode_steps=ticks, fps=FPS)
        executor = Executor(client, env, ExecutorConfig(mode=mode, fps=FPS, merge=merge, threshold=0.5), listeners=[tracking])
        summary = executor.run(episodes=1)
        executor.close()
    summary["mean_boundary_jump"] = executor.stats.boundary_jumps.run_mean
    summary["tracking_rmse"] = tracking.rmse()
    summary["tracking_rmse_settled"] = tracking.rmse(skip=round(SETTLE_S * FPS))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=120, help="control ticks per row (default: 120, 4 s at 30 Hz)")
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
    if not args.no_write:
        write_section("Chunk execution", table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
