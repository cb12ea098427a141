"""``policylink infer``: send observations to a server, print chunk shapes and timings."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from ..client import PolicyClient
from ..observations import example_observation
from ..types import Feature, PolicyMetadata
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
    parser.add_argument("--input", dest="inputs", action="append", default=[], metavar="KEY=SHAPE[:DTYPE]",
                        help="an observation key to send to a server that announces no inputs (openpi), e.g. observation/state=8 or "
                             "observation/image=224x224x3:uint8; repeatable (default: observation/state=8, observation/image=224x224x3:uint8 "
                             "and a 'prompt' from --task)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    inputs = parse_inputs(args.inputs)
    with PolicyClient(
        args.server, api_key=args.api_key, timeout=args.timeout, connect_timeout=args.connect_timeout, ca_file=args.ca_file,
        image_codec=args.image_codec, quality=args.image_quality,
    ) as client:
        if not client.speaks_policylink:
            return _run_plain(args, client, inputs)
        metadata = client.configure(args.policy_path) if args.policy_path else client.metadata
        if metadata is None:
            raise RuntimeError(f"server at {args.server} is idle; pass --policy.path to load a model")
        print(f"server: {metadata.model_id} ({metadata.policy_type}), action_dim={metadata.action_dim}, horizon={metadata.horizon}, actions {metadata.control.name}")
        print("inputs: " + ", ".join(f"{key} {list(feat.shape)} {feat.dtype}" for key, feat in metadata.input_features.items()))
        for i in range(args.repeat):
            chunk = client.infer(example_observation(metadata, seed=i, task=args.task))
            print(format_chunk_line(i, chunk))
    return 0


def _run_plain(args: argparse.Namespace, client: PolicyClient, inputs: dict[str, Feature]) -> int:
    """A plain (openpi) server: it announces no inputs, so send ``--input`` (or openpi's usual keys); its chunk size shows in the reply."""
    if args.policy_path:
        raise RuntimeError(f"server at {args.server} is not a policylink server (openpi protocol): it serves one fixed policy and cannot load {args.policy_path}")
    inputs = inputs or OPENPI_EXAMPLE_INPUTS
    print(f"server: not a policylink server (openpi protocol); metadata {_short(client.server_metadata)}")
    print("sending: " + ", ".join(f"{key} {list(feat.shape)} {feat.dtype}" for key, feat in inputs.items()) + ", prompt")
    example = PolicyMetadata(action_dim=1, horizon=1, input_features=inputs)
    for i in range(args.repeat):
        obs = example_observation(example, seed=i)
        obs["prompt"] = args.task or DEFAULT_PROMPT
        chunk = client.infer(obs)
        if i == 0:
            metadata = client.metadata
            print(f"policy: action_dim={metadata.action_dim}, horizon={metadata.horizon} (from its first reply)")
        print(format_chunk_line(i, chunk))
    return 0


#: What ``infer`` sends a plain server when no ``--input`` is given: openpi's usual keys.
OPENPI_EXAMPLE_INPUTS = {"observation/state": Feature((8,), "float32"), "observation/image": Feature((224, 224, 3), "uint8")}
DEFAULT_PROMPT = "pick up the object"


def parse_inputs(items: list[str]) -> dict[str, Feature]:
    """``KEY=SHAPE[:DTYPE]`` items (``observation/image=224x224x3:uint8``) as features; dtype float32 by default."""
    inputs: dict[str, Feature] = {}
    for item in items:
        key, _, spec = item.partition("=")
        shape_text, _, dtype = spec.partition(":")
        try:
            shape = tuple(int(n) for n in shape_text.lower().split("x"))
            np.dtype(dtype or "float32")
        except (ValueError, TypeError):
            raise ValueError(f"bad --input {item!r}: expected KEY=SHAPE[:DTYPE], e.g. observation/state=8 or observation/image=224x224x3:uint8") from None
        if not key or any(n < 1 for n in shape):
            raise ValueError(f"bad --input {item!r}: expected KEY=SHAPE[:DTYPE] with a key and positive sizes")
        inputs[key] = Feature(shape, dtype or "float32")
    return inputs


def _short(frame: dict[str, Any], limit: int = 200) -> str:
    text = repr(frame)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_chunk_line(index: int, chunk: Any) -> str:
    timing = chunk.server_timing
    first = np.array2string(np.asarray(chunk[0]), precision=3, suppress_small=True, max_line_width=200)
    return (
        f"#{index:<3d} chunk {tuple(chunk.shape)}  roundtrip {chunk['client_timing']['roundtrip_ms']:7.2f} ms"
        f"  server infer {timing.get('infer_ms', float('nan')):7.2f} ms  first action {first}"
    )
