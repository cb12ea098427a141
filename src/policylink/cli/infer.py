"""``policylink infer``: send observations to a server, print chunk shapes and timings."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from ..client import PolicyClient
from ..observations import example_observation
from .run import add_image_codec_flags


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="send test observations to a server and print what comes back",
        description="Connect to a policy server, build observations matching its announced inputs, and print each chunk's shape and timing.",
    )
    parser.add_argument("--server", default="ws://127.0.0.1:8000", help="server URL: ws://host:port, or grpc://host:port with the [grpc] extra (default: ws://127.0.0.1:8000)")
    parser.add_argument("--repeat", type=int, default=1, help="number of requests (default: 1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply (default: 30)")
    parser.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the server to come up (default: 30)")
    parser.add_argument("--api-key", default=os.environ.get("POLICYLINK_API_KEY"), help="API key the server requires (default: $POLICYLINK_API_KEY)")
    parser.add_argument("--ca-file", default=None, metavar="PEM", help="wss:// or grpcs://: the CA certificate that signed the server's (default: the system's roots)")
    parser.add_argument("--task", default=None, help="language instruction to send as 'task'")
    add_image_codec_flags(parser)
    parser.add_argument("--policy.path", dest="policy_path", default=None, help="ask an idle server to load this checkpoint first")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with PolicyClient(
        args.server, api_key=args.api_key, timeout=args.timeout, connect_timeout=args.connect_timeout, ca_file=args.ca_file,
        image_codec=args.image_codec, quality=args.image_quality,
    ) as client:
        metadata = client.configure(args.policy_path) if args.policy_path else client.metadata
        if metadata is None:
            raise RuntimeError(f"server at {args.server} is idle; pass --policy.path to load a model")
        print(f"server: {metadata.model_id} ({metadata.policy_type}), action_dim={metadata.action_dim}, horizon={metadata.horizon}")
        print(f"inputs: " + ", ".join(f"{key} {list(feat.shape)} {feat.dtype}" for key, feat in metadata.input_features.items()))
        for i in range(args.repeat):
            chunk = client.infer(example_observation(metadata, seed=i, task=args.task))
            print(format_chunk_line(i, chunk))
    return 0


def format_chunk_line(index: int, chunk: Any) -> str:
    timing = chunk.server_timing
    first = np.array2string(np.asarray(chunk[0]), precision=3, suppress_small=True, max_line_width=200)
    return (
        f"#{index:<3d} chunk {tuple(chunk.shape)}  roundtrip {chunk['client_timing']['roundtrip_ms']:7.2f} ms"
        f"  server infer {timing.get('infer_ms', float('nan')):7.2f} ms  first action {first}"
    )
