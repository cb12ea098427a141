"""``policylink demo``: a local server with a built-in policy and a client talking to it."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..client import PolicyClient
from ..envs.fake import FakeEnv
from ..observations import example_observation
from ..policies.builtin import ReplayPolicy
from ..runtime.executor import Executor, ExecutorConfig
from ..runtime.stats import format_summary
from ..server.background import BackgroundServer
from .infer import format_chunk_line


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a local server and client end to end (no checkpoint, no GPU)",
        description="Start a server on 127.0.0.1 with the built-in replay policy (6-d single arm, front camera 480x640), send observations from a client, and print the chunks and timings.",
    )
    parser.add_argument("--requests", type=int, default=10, help="number of observations to send (default: 10)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="simulated inference time of the built-in policy (default: 20)")
    parser.add_argument("--loop-seconds", type=float, default=2.0, help="then drive a fake arm at 30 Hz (async) for this long and print the loop statistics; 0 skips it (default: 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The demo prints its own lines; the in-process server's per-request log would drown them.
    if args.log_level != "debug":
        for name in ("policylink.server", "websockets"):
            logging.getLogger(name).setLevel(logging.WARNING)
    policy = ReplayPolicy(action_dim=6, horizon=16, cameras={"front": (480, 640)}, latency_ms=args.latency_ms)
    with BackgroundServer(policy) as server, PolicyClient(server.url) as client:
        metadata = client.metadata
        assert metadata is not None
        print(f"demo: server on {server.url} serving {metadata.model_id}: {metadata.description}")
        for i in range(args.requests):
            chunk = client.infer(example_observation(metadata, seed=i))
            print(format_chunk_line(i, chunk))
        if args.loop_seconds > 0:
            _drive_fake_arm(client, args.loop_seconds)
    print("demo: done")
    return 0


def _drive_fake_arm(client: PolicyClient, seconds: float) -> None:
    """Run the control loop on a fake arm (async, 30 Hz) and print its statistics."""
    fps = 30.0
    steps = max(1, round(seconds * fps))
    env = FakeEnv("single", cameras=["front"], image_size=(480, 640), episode_steps=steps, fps=fps)
    print(f"demo: driving a fake 6-d arm for {steps} steps at {fps:g} Hz (async, latency compensation)")
    with Executor(client, env, ExecutorConfig(mode="async", fps=fps)) as executor:
        summary = executor.run(episodes=1)
    print(format_summary(summary))
