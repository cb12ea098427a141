"""``policylink serve``: serve a policy (or start idle) until Ctrl+C."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from ..policies.builtin import BUILTIN_POLICIES, make_builtin_policy
from ..types import Policy

logger = logging.getLogger("policylink.server")

HELP = """\
Serve a policy over WebSocket (openpi-compatible msgpack protocol).

Choose the policy with --policy.path (a LeRobot checkpoint directory; needs
the [server] extra) or --policy.type (a built-in policy, no checkpoint). With
neither, the server starts idle and each client chooses the model with a
configure request.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="serve a policy to remote clients", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_flags(parser)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="WebSocket port (default: 8000)")
    parser.add_argument("--api-key", default=None, help="require this key from clients (header 'Authorization: Api-Key KEY')")
    parser.add_argument("--max-message-mb", type=float, default=64.0, help="largest request accepted, in MiB (default: 64)")
    parser.set_defaults(func=run)


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """The ``--policy.*`` flags shared by every command that builds a policy."""
    group = parser.add_argument_group("policy")
    group.add_argument("--policy.path", dest="policy_path", default=None, help="LeRobot checkpoint directory to serve")
    group.add_argument("--policy.type", dest="policy_type", default=None, choices=sorted(BUILTIN_POLICIES), help="built-in policy to serve (no checkpoint needed)")
    group.add_argument("--policy.action_dim", dest="action_dim", type=int, default=6, help="built-in: action dimension (default: 6)")
    group.add_argument("--policy.state_dim", dest="state_dim", type=int, default=None, help="built-in: state dimension (default: action_dim)")
    group.add_argument("--policy.horizon", dest="horizon", type=int, default=16, help="built-in: chunk length (default: 16)")
    group.add_argument("--policy.fps", dest="fps", type=float, default=30.0, help="built-in: control rate announced to clients (default: 30)")
    group.add_argument("--policy.cameras", dest="cameras", default="", help="built-in: cameras as NAME=HxW,... (e.g. front=480x640,wrist=480x640)")
    group.add_argument("--policy.latency_ms", dest="latency_ms", type=float, default=0.0, help="built-in: simulated inference time in ms (default: 0)")
    group.add_argument("--policy.seed", dest="seed", type=int, default=0, help="built-in random: seed (default: 0)")
    group.add_argument("--policy.value", dest="value", type=float, default=0.0, help="built-in constant: the action value (default: 0)")
    group.add_argument("--policy.actions", dest="actions", default=None, help="built-in replay: .npy/.npz file of recorded actions (default: a smooth sine trajectory)")
    group.add_argument("--device", default="auto", help="LeRobot checkpoints: cpu, cuda, cuda:N, mps or auto (default: auto)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="LeRobot checkpoints: opt-in mixed precision (default: float32)")


def parse_cameras(text: str) -> dict[str, tuple[int, int]]:
    """Parse ``front=480x640,wrist=224x224`` into ``{"front": (480, 640), ...}``."""
    cameras: dict[str, tuple[int, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, size = item.partition("=")
        try:
            height, width = (int(n) for n in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad camera spec {item!r}: expected NAME=HxW, e.g. front=480x640") from None
        cameras[name] = (height, width)
    return cameras


def builtin_from_args(args: argparse.Namespace) -> Policy:
    options: dict[str, Any] = dict(
        action_dim=args.action_dim, horizon=args.horizon, fps=args.fps, state_dim=args.state_dim,
        cameras=parse_cameras(args.cameras), latency_ms=args.latency_ms,
    )
    if args.policy_type == "random":
        options["seed"] = args.seed
    elif args.policy_type == "constant":
        options["value"] = args.value
    elif args.policy_type == "replay":
        options["actions"] = args.actions
    return make_builtin_policy(args.policy_type, **options)


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    """The policy the flags ask for, or ``None`` for an idle server."""
    if args.policy_path and args.policy_type:
        raise ValueError("give either --policy.path or --policy.type, not both")
    if args.policy_type:
        return builtin_from_args(args)
    if args.policy_path:
        return _lerobot_backend().load_policy(args.policy_path, device=args.device, dtype=args.dtype)
    return None


def model_loader() -> Any:
    """The loader for configure requests, if the [server] extra is installed."""
    try:
        return _lerobot_backend().load_from_request
    except ImportError:
        return None


def _lerobot_backend() -> Any:
    try:
        from ..backends import lerobot as backend
    except ImportError as exc:
        raise ImportError(f"serving LeRobot checkpoints needs the server extra: pip install 'policylink[server]' ({exc})") from None
    return backend


def run(args: argparse.Namespace) -> int:
    from ..server.app import run_servers
    from ..server.engine import Engine
    from ..server.websocket import WebSocketServer

    policy = policy_from_args(args)
    engine = Engine(policy, loader=model_loader())
    ws = WebSocketServer(engine, args.host, args.port, api_key=args.api_key, max_message_bytes=int(args.max_message_mb * 2**20))

    def announce() -> None:
        what = f"policy {policy.metadata.model_id}" if policy else "no model (idle: clients send a configure request)"
        print(f"policylink: serving {what} on ws://{args.host}:{ws.port} (health: http://{args.host}:{ws.port}/healthz); Ctrl+C to stop", flush=True)

    asyncio.run(run_servers(engine, [ws], on_ready=announce))
    print("policylink: server stopped", flush=True)
    return 0
