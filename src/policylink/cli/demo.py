"""``policylink demo``: a local server with a built-in policy and a client talking to it."""

from __future__ import annotations

import argparse
from typing import Any

from ..client import PolicyClient
from ..observations import example_observation
from ..policies.builtin import ReplayPolicy
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = ReplayPolicy(action_dim=6, horizon=16, cameras={"front": (480, 640)}, latency_ms=args.latency_ms)
    with BackgroundServer(policy) as server, PolicyClient(server.url) as client:
        metadata = client.metadata
        assert metadata is not None
        print(f"demo: server on {server.url} serving {metadata.model_id}: {metadata.description}")
        for i in range(args.requests):
            chunk = client.infer(example_observation(metadata, seed=i))
            print(format_chunk_line(i, chunk))
    print("demo: done")
    return 0
