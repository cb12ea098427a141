"""Simulation evaluation throughput: episodes per minute for K = 1, 2, 4, 8 parallel PushT environments.

One ``policylink serve`` process (the built-in replay policy: 2-d actions,
chunks of 8, an optional simulated inference time) answers K environments,
each its own client session, run by ``policylink.evaluation.evaluate`` in
this process: PushT with its 96x96 camera image, sync execution of 8
actions per chunk, fixed-length episodes.

    .venv/bin/python benchmarks/eval.py [--episodes 24] [--steps 100] [--latency-ms 0 20]
"""

from __future__ import annotations

import argparse
import logging

from _process import policylink_server
from _report import write_section
from policylink.evaluation import EvalConfig, evaluate

KS = (1, 2, 4, 8)


def run(port: int, k: int, episodes: int, steps: int) -> dict:
    config = EvalConfig(env="pusht", episodes=episodes, num_envs=k, seed=0, max_steps=steps)
    return evaluate(f"ws://127.0.0.1:{port}", config).summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=24, help="episodes per K (default: 24)")
    parser.add_argument("--steps", type=int, default=100, help="steps per episode (default: 100)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0], help="simulated inference times to try (default: 0 20)")
    args = parser.parse_args()
    logging.getLogger("policylink").setLevel(logging.WARNING)

    rows = []
    for latency in args.latency_ms:
        flags = ["--policy.type", "replay", "--policy.action_dim", "2", "--policy.horizon", "8", "--policy.latency_ms", str(latency)]
        with policylink_server(*flags) as port:
            run(port, 1, 2, 10)  # warm-up: imports, first connections
            base = None
            for k in KS:
                summary = run(port, k, args.episodes, args.steps)
                base = base or summary["episodes_per_minute"]
                rows.append(
                    f"| {latency:g} | {k} | {summary['episodes']} | {summary['wall_s']:.2f} | {summary['episodes_per_minute']:.0f} "
                    f"| {summary['steps_per_second']:.0f} | {summary['roundtrip_ms']['p50']:.1f} | {summary['roundtrip_ms']['p99']:.1f} "
                    f"| {summary['episodes_per_minute'] / base:.2f}x |"
                )
                print(rows[-1], flush=True)

    body = (
        f"PushT (gym-pusht, 96x96 image + 2-d state), {args.episodes} episodes of {args.steps} steps per row, sync execution "
        "of 8-action chunks by the runtime's executor (stepped clock, no simulated latency); one `policylink serve` process with the built-in replay policy (`--policy.latency_ms` = the "
        "simulated inference time); K environments in threads of one client process, each its own session.\n\n"
        "| inference ms | K | episodes | wall s | episodes/min | steps/s | round trip p50 ms | round trip p99 ms | vs K=1 |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n\n"
        "With a model that takes time, parallel environments hide its latency: while one waits for its chunk the "
        "others step. With an instant model the simulator and the client's own encoding are the bottleneck, and the "
        "machine's CPU count caps the gain. Wall time includes each worker's start (building its simulator, "
        "connecting), which weighs on the K=8 rows: 3 episodes per worker. Past 4 workers on 2 cores the simulator "
        "threads mostly queue for the CPU and the GIL."
    )
    write_section("Simulation evaluation", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
