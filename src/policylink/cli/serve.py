"""``policylink serve``: serve a policy (or start idle) until Ctrl+C."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
from typing import Any

from ..allocator import tune_allocator
from ..action_space import ActionSpace
from ..policies.builtin import BUILTIN_POLICIES, make_builtin_policy
from ..rayserve.run import add_ray_flags
from ..rtc.request import SCHEDULES, RTCSupport
from ..server.auth import API_KEY_ENV
from ..server.connections import DEFAULT_MAX_CONNECTIONS
from ..types import Policy
from .config import add_config_flags

logger = logging.getLogger("policylink.server")

HELP = """\
Serve a policy over WebSocket (openpi-compatible msgpack protocol), and
optionally over gRPC (--grpc-port), length-prefixed TCP (--tcp-port) and
LeRobot's async-inference protocol (--lerobot-compat-port, --trust-pickle),
all on the same model.

Choose the policy with --policy.path (a LeRobot checkpoint directory; needs
the [server] extra) or --policy.type (a built-in policy, no checkpoint). With
neither, the server starts idle and each client chooses the model with a
configure request (limit which checkpoints with --model-root).

Scale out: --ray serves the policy from several replicas (GPUs, machines) on
Ray Serve behind this one port (see docs/scale-out.md).

Security: --api-key-file (or $POLICYLINK_API_KEY) locks every port with one
key; --tls-cert/--tls-key make the WebSocket port wss:// and the gRPC port
grpcs://. See docs/protocol.md and docs/protocols.md.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="serve a policy to remote clients", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    add_policy_flags(parser)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--ws-port", "--port", dest="port", type=int, default=8000, help="WebSocket port (default: 8000; --port is an alias)")
    security = parser.add_argument_group("security (docs/protocol.md)")
    security.add_argument("--api-key-file", default=None, metavar="PATH", help=f"require the key in this file from clients on every port (or set ${API_KEY_ENV})")
    security.add_argument("--api-key", default=None, help="the key itself; visible to every local user in the process list, prefer --api-key-file")
    security.add_argument("--tls-cert", default=None, help="PEM certificate; with --tls-key the WebSocket port speaks wss:// and the gRPC port grpcs://")
    security.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    security.add_argument("--model-root", action="append", default=[], metavar="DIR",
                          help="configure requests may load checkpoints only under this folder (repeatable); others get 'not allowed'")
    add_protocol_flags(parser)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-message-mb", type=float, default=64.0, help="largest request accepted on every protocol, in MiB (default: 64)")
    limits.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"WebSocket + TCP connections at once; more are refused as busy (default: {DEFAULT_MAX_CONNECTIONS})")
    limits.add_argument("--read-timeout", type=float, default=10.0, metavar="S", help="TCP: close a connection silent this long inside a frame (default: 10)")
    limits.add_argument("--idle-timeout", type=float, default=300.0, metavar="S", help="TCP: close a connection silent this long between requests (default: 300)")
    add_ray_flags(parser)
    operations = parser.add_argument_group("operations (docs/deploy.md)")
    operations.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                            help="on SIGTERM / Ctrl+C: stop accepting, let running requests finish for up to S seconds, then close (default: 30)")
    operations.add_argument("--summary-every", type=float, default=60.0, metavar="S",
                            help="log one summary line (clients, requests, errors, latency) every S seconds; 0 turns it off (default: 60)")
    parser.add_argument("--malloc-tuning", action="store_true",
                        help="raise glibc's mmap/trim thresholds so that message buffers are reused instead of mapped and unmapped "
                             "per message (policylink.allocator; measured in BENCHMARKS.md, round trip: no gain on our test machine)")
    parser.add_argument("--metrics-port", type=int, default=None, help="also serve Prometheus metrics on this port (they are always at /metrics on the WebSocket port)")
    parser.add_argument("--preload", action="append", default=[], metavar="CHECKPOINT",
                        help="load this checkpoint into the model cache at start, for clients that configure it (repeatable; counts in --max-models)")
    parser.add_argument("--max-models", type=int, metavar="N", default=2, help="models kept loaded for configure requests; least recently used evicted (default: 2)")
    parser.add_argument("--model-memory-gb", type=float, metavar="GB", default=None, help="also evict when cached models' weights exceed this many GiB (default: no limit)")
    batching = parser.add_argument_group("batching across clients")
    batching.add_argument("--max-batch", type=int, default=8, help="largest batch of requests from different clients run in one forward pass; 1 turns batching off (default: 8)")
    batching.add_argument("--batch-timeout-ms", type=float, default=2.0, help="how long a request waits for others to share its batch (default: 2)")
    batching.add_argument("--max-queue", type=int, default=64, help="requests queued per model before new ones get 'server busy' (default: 64)")
    batching.add_argument("--no-overlap", dest="overlap", action="store_false",
                          help="prepare each request (resize, normalise, tokenise, copy to the device) inside its batch on the model's thread, "
                               "instead of on its own thread while the batch before runs (default: overlap)")
    parser.set_defaults(func=run)


def add_protocol_flags(parser: argparse.ArgumentParser) -> None:
    """gRPC, TCP and LeRobot-compat listeners beside the WebSocket one (see docs/protocols.md)."""
    group = parser.add_argument_group("more protocols on the same model (docs/protocols.md)")
    group.add_argument("--grpc-port", type=int, default=None, help="also serve the typed gRPC protocol on this port (needs the [grpc] extra)")
    group.add_argument("--tcp-port", type=int, default=None, help="also serve length-prefixed TCP (4-byte big-endian length + msgpack) on this port")
    group.add_argument("--lerobot-compat-port", "--lerobot-compat", dest="lerobot_compat_port", type=int, default=None, metavar="PORT",
                       help="also serve LeRobot 0.4.4's async-inference gRPC service on this port; needs --trust-pickle")
    group.add_argument("--lerobot-compat-host", default="127.0.0.1", help="address of the LeRobot-compat port (default: 127.0.0.1, this machine only)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="admit pickled payloads (LeRobot compat, pickled TCP frames). DANGER: a pickle can run code on this server; "
                            "payloads go through a restricted unpickler, but serve trusted clients only")
    group.add_argument("--pickle-class", action="append", default=[], metavar="MODULE:CLASS",
                       help="TCP pickles: a legacy client's observation class, rebuilt as a plain attribute bag (never imported); repeatable")
    group.add_argument("--legacy-tcp-port", type=int, default=None, metavar="PORT",
                       help="also serve legacy MetaObs/MetaAction pickle clients unchanged (no metadata frame; pickled MetaObs in, "
                            "a pickled list of MetaAction out); needs --trust-pickle, refused with an API key (they cannot send one)")
    group.add_argument("--legacy-tcp-host", default="127.0.0.1", help="address of the legacy port (default: 127.0.0.1, this machine only)")
    group.add_argument("--legacy-module", default="benchmark.base", metavar="MODULE",
                       help="the module legacy clients define MetaObs and MetaAction in (default: benchmark.base); never imported")


def check_protocol_flags(args: argparse.Namespace) -> None:
    """Refuse unsafe or incomplete protocol flags before any model is loaded."""
    if args.lerobot_compat_port is not None and not args.trust_pickle:
        raise ValueError("--lerobot-compat-port needs --trust-pickle: LeRobot's protocol sends pickles, which can run code on this server")
    if args.legacy_tcp_port is not None:
        if not args.trust_pickle:
            raise ValueError("--legacy-tcp-port needs --trust-pickle: legacy clients send pickles, which can run code on this server")
        from ..server.auth import resolve_api_key

        if resolve_api_key(args.api_key, args.api_key_file):
            raise ValueError("--legacy-tcp-port cannot be locked with an API key: legacy clients send none. Serve them from a "
                             "server without a key, on --legacy-tcp-host 127.0.0.1 or a trusted network")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")


def max_message_bytes(args: argparse.Namespace) -> int:
    """``--max-message-mb`` in bytes: the limit every protocol applies to one request."""
    return int(args.max_message_mb * 2**20)


def protocol_servers(args: argparse.Namespace, engine: Any) -> list[Any]:
    """The extra listeners the flags ask for (call :func:`check_protocol_flags` first)."""
    servers: list[Any] = []
    max_bytes = max_message_bytes(args)
    if args.trust_pickle:
        print("policylink: WARNING: --trust-pickle: clients' pickled payloads are admitted; a crafted pickle can run code on this server. "
              "They go through a restricted unpickler, but serve trusted clients on a trusted network only.", flush=True)
    if args.grpc_port is not None:
        try:
            from ..server.grpc_server import GrpcServer
        except ImportError as exc:
            raise ValueError(f"--grpc-port needs the grpc extra: pip install 'policylink[grpc]' ({exc})") from None
        servers.append(GrpcServer(engine, args.host, args.grpc_port, tls_cert=args.tls_cert, tls_key=args.tls_key, max_message_bytes=max_bytes))
    if args.tcp_port is not None:
        from ..server.tcp import TcpServer

        servers.append(TcpServer(
            engine, args.host, args.tcp_port, max_frame_bytes=max_bytes, trust_pickle=args.trust_pickle, pickle_records=args.pickle_class,
            read_timeout_s=args.read_timeout, idle_timeout_s=args.idle_timeout,
        ))
    if args.lerobot_compat_port is not None:
        try:
            from ..server.lerobot_compat import LeRobotCompatServer
        except ImportError as exc:
            raise ValueError(f"--lerobot-compat-port needs the server and grpc extras ({exc})") from None
        servers.append(LeRobotCompatServer(engine, args.lerobot_compat_host, args.lerobot_compat_port, max_message_bytes=max_bytes))
    if args.legacy_tcp_port is not None:
        from ..server.legacy_tcp import LegacyTcpServer

        servers.append(LegacyTcpServer(
            engine, args.legacy_tcp_host, args.legacy_tcp_port, module=args.legacy_module, max_frame_bytes=max_bytes,
            read_timeout_s=args.read_timeout, idle_timeout_s=args.idle_timeout,
        ))
    return servers


def describe_server(server: Any) -> str:
    """``grpc://host:port`` and the like, for the start-up line."""
    kind = type(server).__name__
    if kind == "LegacyTcpServer":
        return f"legacy pickle clients ({server.module}.MetaObs -> MetaAction) on tcp://{server.host}:{server.port}"
    if kind == "GrpcServer":
        return f"{server.scheme}://{server.host}:{server.port}"
    if kind == "TcpServer":
        return f"tcp://{server.host}:{server.port}" + (" (msgpack + pickle)" if server.trust_pickle else " (msgpack)")
    if kind == "LeRobotCompatServer":
        return f"LeRobot async inference on {server.host}:{server.port}"
    return kind


def batch_options_from_args(args: argparse.Namespace) -> Any:
    from ..server.engine import BatchOptions

    if args.max_batch < 1 or args.max_queue < 1:
        raise ValueError("--max-batch and --max-queue must be at least 1")
    return BatchOptions(max_batch=args.max_batch, batch_timeout_ms=args.batch_timeout_ms, max_queue=args.max_queue, overlap=getattr(args, "overlap", True))


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """The ``--policy.*`` flags shared by every command that builds a policy."""
    group = parser.add_argument_group("policy")
    group.add_argument("--policy.path", dest="policy_path", default=None, help="LeRobot checkpoint directory to serve")
    group.add_argument("--policy.type", dest="policy_type", default=None, choices=sorted(BUILTIN_POLICIES), help="built-in policy to serve (no checkpoint needed)")
    group.add_argument("--policy.action_dim", dest="action_dim", type=int, default=6, help="built-in: action dimension (default: 6)")
    group.add_argument("--policy.state_dim", dest="state_dim", type=int, default=None, help="built-in: state dimension (default: action_dim)")
    group.add_argument("--policy.horizon", dest="horizon", type=int, default=None, help="built-in: chunk length (default: 16; flow: 50, like SmolVLA's and pi0's chunks)")
    group.add_argument("--policy.fps", dest="fps", type=float, default=30.0, help="built-in: control rate announced to clients (default: 30)")
    group.add_argument("--policy.cameras", dest="cameras", default="", help="built-in: cameras as NAME=HxW,... (e.g. front=480x640,wrist=480x640)")
    group.add_argument("--policy.latency_ms", dest="latency_ms", type=float, default=0.0, help="built-in: simulated inference time in ms (default: 0)")
    group.add_argument("--policy.seed", dest="seed", type=int, default=0, help="built-in random: seed (default: 0)")
    group.add_argument("--policy.value", dest="value", type=float, default=0.0, help="built-in constant: the action value (default: 0)")
    group.add_argument("--policy.actions", dest="actions", default=None, help="built-in replay: .npy/.npz file of recorded actions (default: a smooth sine trajectory)")
    group.add_argument("--device", default="auto", help="LeRobot checkpoints: cpu, cuda, cuda:N, mps or auto (default: auto)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="LeRobot checkpoints: opt-in mixed precision (default: float32)")
    group.add_argument("--compile", nargs="?", const="default", default=None, choices=["default", "reduce-overhead", "max-autotune"], metavar="MODE",
                       help="LeRobot checkpoints: torch.compile the policy's network, warmed up at load for batches of one and more "
                            "(takes minutes; MODE default, reduce-overhead = CUDA graphs on a GPU, or max-autotune; default: off). "
                            "Measured in BENCHMARKS.md")
    group.add_argument("--policy.task", dest="policy_task", metavar="TEXT", default=None, help="LeRobot checkpoints: prompt used when an observation carries no 'task'/'prompt'")
    group.add_argument("--policy.action_space", dest="policy_action_space", metavar="SPACE/TYPE", default=None,
                       help="what the policy's actions mean: joint|ee / abs|relative|delta, e.g. ee/delta; clients turn relative and "
                            "delta chunks into absolute commands (default: the checkpoint's policylink.json, else joint/abs). "
                            "With run --server: what a server that declares none (openpi) sends")
    group.add_argument("--policy.absolute_dims", dest="policy_absolute_dims", metavar="DIMS", default="",
                       help="with --policy.action_space: comma-separated dimensions that stay absolute (e.g. -1, a gripper)")
    group.add_argument("--policy.gripper_continuous", dest="policy_gripper_continuous", action="store_true",
                       help="with --policy.action_space: the last dimension is a continuous gripper position (told to legacy clients)")
    group.add_argument("--policy.rename_map", dest="policy_rename_map", metavar="CLIENT=POLICY,...", default="", help="LeRobot checkpoints: client camera names to policy camera names, CLIENT=POLICY,... (e.g. top=front)")
    rtc = parser.add_argument_group("real-time chunking (flow-matching policies: flow, SmolVLA, pi0, pi0.5)")
    rtc.add_argument("--policy.rtc_guidance", dest="rtc_guidance", metavar="W", type=float, default=10.0,
                     help="guidance weight cap when a request names none (LeRobot's max_guidance_weight; default: 10)")
    rtc.add_argument("--policy.rtc_max_guidance", dest="rtc_max_guidance", metavar="W", type=float, default=50.0,
                     help="largest guidance weight a request may ask for (default: 50)")
    rtc.add_argument("--policy.rtc_schedule", dest="rtc_schedule", choices=SCHEDULES, default="linear",
                     help="how the guidance falls off after the delay, when a request names none (default: linear)")
    rtc.add_argument("--policy.rtc_horizon", dest="rtc_horizon", metavar="STEPS", type=int, default=10,
                     help="execution horizon when a request names none (default: 10, at most the chunk length)")
    rtc.add_argument("--policy.no_rtc", dest="no_rtc", action="store_true",
                     help="ignore real-time-chunking fields in requests (the metadata then says the policy cannot use them)")


def rtc_support_from_args(args: argparse.Namespace) -> RTCSupport | None:
    """The server's real-time-chunking defaults from the ``--policy.rtc_*`` flags (``None`` with ``--policy.no_rtc``)."""
    if getattr(args, "no_rtc", False):
        return None
    try:
        return RTCSupport(guidance=args.rtc_guidance, max_guidance=args.rtc_max_guidance, schedule=args.rtc_schedule,
                          execution_horizon=args.rtc_horizon)
    except ValueError as exc:
        raise ValueError(f"--policy.rtc_*: {exc}") from None


def control_from_args(args: argparse.Namespace) -> ActionSpace | None:
    """The action space ``--policy.action_space`` declares; ``None`` when not given (the checkpoint's, else joint/abs)."""
    text = getattr(args, "policy_action_space", None)
    dims_text = getattr(args, "policy_absolute_dims", "") or ""
    gripper = bool(getattr(args, "policy_gripper_continuous", False))
    if text is None:
        if dims_text or gripper:
            raise ValueError("--policy.absolute_dims and --policy.gripper_continuous need --policy.action_space")
        return None
    try:
        dims = [int(part) for part in dims_text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"bad --policy.absolute_dims {dims_text!r}: expected comma-separated integers, e.g. -1 or 5,11") from None
    try:
        return ActionSpace.parse(text, absolute_dims=dims, gripper_continuous=gripper)
    except ValueError as exc:
        raise ValueError(f"--policy.action_space: {exc}") from None


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
        action_dim=args.action_dim, fps=args.fps, state_dim=args.state_dim, cameras=parse_cameras(args.cameras), latency_ms=args.latency_ms,
    )
    if args.horizon is not None:
        options["horizon"] = args.horizon
    if args.policy_type == "random":
        options["seed"] = args.seed
    elif args.policy_type == "constant":
        options["value"] = args.value
    elif args.policy_type == "replay":
        options["actions"] = args.actions
    elif args.policy_type == "flow":
        options["seed"] = args.seed
        options["rtc"] = rtc_support_from_args(args)
    control = control_from_args(args)
    if control is not None:
        control.check_dims(args.action_dim)
        options["control"] = control
    return make_builtin_policy(args.policy_type, **options)


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    """The policy the flags ask for, or ``None`` for an idle server."""
    if args.policy_path and args.policy_type:
        raise ValueError("give either --policy.path or --policy.type, not both")
    if args.policy_type:
        if getattr(args, "compile", None):
            raise ValueError("--compile applies to LeRobot checkpoints (--policy.path), not to built-in policies")
        return builtin_from_args(args)
    if args.policy_path:
        return _lerobot_backend().load_policy(
            args.policy_path, device=args.device, dtype=args.dtype,
            task=getattr(args, "policy_task", None), rename_map=getattr(args, "policy_rename_map", None),
            rtc=rtc_support_from_args(args), compile=getattr(args, "compile", None), control=control_from_args(args),
        )
    return None


def model_loader(rtc: RTCSupport | None = RTCSupport(), compile: str | None = None) -> Any:
    """The loader for configure requests, if the [server] extra is installed (``rtc``, ``compile``: the server's settings)."""
    try:
        return functools.partial(_lerobot_backend().load_from_request, rtc=rtc, compile=compile)
    except ImportError:
        return None


def loader_options(rtc: RTCSupport | None = RTCSupport(), compile: str | None = None) -> dict[str, Any]:
    """Engine options that come with the LeRobot loader (none without the [server] extra).

    Importing torch and LeRobot here, at start-up, keeps the first configure
    request from importing them while other clients are being served.
    """
    try:
        backend = _lerobot_backend()
    except ImportError:
        return {}
    backend.import_runtime()
    return {"loader": functools.partial(backend.load_from_request, rtc=rtc, compile=compile), "resolve_device": backend.resolve_device, "estimate_bytes": backend.estimate_checkpoint_bytes}


def policy_request_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The configure request that names the served checkpoint (so clients configuring it share the model)."""
    if not args.policy_path:
        return None
    return {"policy_path": args.policy_path, "device": args.device, "dtype": args.dtype, "rename_map": args.policy_rename_map}


def engine_from_args(args: argparse.Namespace, policy: Policy | None, *, warming: bool = False) -> Any:
    """The engine the serve flags describe (call :func:`check_protocol_flags` first); ``warming``: the policy comes later."""
    from ..server.auth import resolve_api_key
    from ..server.engine import Engine

    if args.api_key is not None:
        print(f"policylink: WARNING: --api-key on the command line is visible to every local user; prefer --api-key-file or ${API_KEY_ENV}", flush=True)
    for root in args.model_root:
        if not os.path.isdir(root):
            raise ValueError(f"--model-root {root!r} is not a directory")
    budget = int(args.model_memory_gb * 2**30) if args.model_memory_gb else None
    request = policy_request_from_args(args)
    if args.max_connections < 1:
        raise ValueError("--max-connections must be at least 1")
    return Engine(
        policy, max_models=args.max_models, memory_budget_bytes=budget, batching=batch_options_from_args(args),
        policy_request=request, model_roots=args.model_root, api_key=resolve_api_key(args.api_key, args.api_key_file),
        max_connections=args.max_connections, warming=warming, **loader_options(rtc_support_from_args(args), args.compile),
    )


def _lerobot_backend() -> Any:
    try:
        from ..backends import lerobot as backend
    except ImportError as exc:
        raise ImportError(f"serving LeRobot checkpoints needs the server extra: pip install 'policylink[server]' ({exc})") from None
    return backend


def run(args: argparse.Namespace) -> int:
    from ..server.app import run_servers
    from ..server.websocket import WebSocketServer

    check_protocol_flags(args)
    if args.ray:
        from ..rayserve import run as run_on_ray

        return run_on_ray(args)
    if args.malloc_tuning and not tune_allocator():
        print("policylink: --malloc-tuning: this C library has no mallopt (not glibc); allocator left as it is", flush=True)
    # A checkpoint loads after the ports open: /healthz answers meanwhile, /readyz once it is warmed.
    loads_later = bool(args.policy_path) and not args.policy_type
    policy = None if loads_later else policy_from_args(args)
    engine = engine_from_args(args, policy, warming=loads_later or bool(args.preload))
    if args.preload and engine.loader is None:
        raise ValueError("--preload needs the server extra (LeRobot): pip install 'policylink[server]'")

    def warm_up() -> None:
        if loads_later:
            engine.install(policy_from_args(args), policy_request_from_args(args), ready=False)
        for path in args.preload:
            engine.preload({"policy_path": path, "device": args.device, "dtype": args.dtype})
            logger.info("preloaded %s", path)
        engine.set_ready()

    ws = WebSocketServer(engine, args.host, args.port, max_message_bytes=max_message_bytes(args), tls_cert=args.tls_cert, tls_key=args.tls_key)
    if getattr(args, "metrics_port", None) is not None:
        engine.metrics.serve(args.metrics_port, args.host)
        print(f"policylink: Prometheus metrics on http://{args.host}:{args.metrics_port}/metrics", flush=True)

    extra = protocol_servers(args, engine)

    def announce() -> None:
        if loads_later:
            what = f"policy {args.policy_path} (loading: /readyz answers 200 once it is warmed; clients connecting meanwhile wait)"
        else:
            what = f"policy {policy.metadata.model_id}" if policy else "no model (idle: clients send a configure request)"
        health = f"{'https' if ws.tls else 'http'}://{args.host}:{ws.port}/healthz"
        locked = "; every port needs the API key" if engine.auth.required else ""
        print(f"policylink: serving {what} on {ws.scheme}://{args.host}:{ws.port} (health: {health}){locked}; Ctrl+C to stop", flush=True)
        if extra:
            print("policylink: also serving " + ", ".join(describe_server(server) for server in extra), flush=True)

    asyncio.run(run_servers(engine, [ws, *extra], on_ready=announce, warm_up=warm_up if loads_later or args.preload else None,
                            drain_s=args.drain_timeout, summary_s=args.summary_every or None))
    print("policylink: server stopped", flush=True)
    return 0
