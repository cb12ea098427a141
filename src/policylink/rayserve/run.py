"""``policylink serve --ray``: the command-line side of :mod:`policylink.rayserve`."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from .cluster import LOOPBACK_ENV

__all__ = ["run", "add_ray_flags", "scale_options_from_args", "replica_settings"]

#: Serve flags a Ray deployment does not offer yet, and why.
_UNSUPPORTED = {
    "grpc_port": "--grpc-port",
    "tcp_port": "--tcp-port",
    "lerobot_compat_port": "--lerobot-compat-port",
    "legacy_tcp_port": "--legacy-tcp-port",
    "tls_cert": "--tls-cert",
    "metrics_port": "--metrics-port",
}


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale out on Ray Serve (needs the [ray] extra; docs/scale-out.md)")
    group.add_argument("--ray", action="store_true", help="serve the policy from several replicas on Ray Serve, behind this one WebSocket port")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (e.g. HEAD:6379); default: start a local Ray on 127.0.0.1 for this command")
    group.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas when not autoscaling (default: 1)")
    group.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscale between --min-replicas and --max-replicas")
    group.add_argument("--max-replicas", type=int, default=None, metavar="N", help="autoscaling's upper bound")
    group.add_argument("--target-clients", type=float, default=4.0, metavar="N",
                       help="autoscaling target: open client connections per replica (default: 4)")
    group.add_argument("--max-clients-per-replica", type=int, default=32, metavar="N",
                       help="client connections one replica takes; more wait for a free replica (default: 32)")
    group.add_argument("--replica-cpus", type=float, default=1.0, metavar="N", help="CPUs reserved per replica (default: 1)")
    group.add_argument("--replica-gpus", type=float, default=0.0, metavar="N",
                       help="GPUs per replica; fractions share one GPU, e.g. 0.5 (default: 0)")
    group.add_argument("--replica-host", default=None, metavar="HOST",
                       help="address replicas listen on (default: 127.0.0.1 with a local Ray, 0.0.0.0 with --ray-address)")
    group.add_argument("--ray-temp-dir", default=None, metavar="DIR", help="local Ray's temporary files and token (default: a new folder under /tmp)")


def scale_options_from_args(args: argparse.Namespace) -> Any:
    from .cluster import ScaleOptions

    return ScaleOptions(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas, target_clients=args.target_clients,
        max_clients_per_replica=args.max_clients_per_replica, cpus_per_replica=args.replica_cpus, gpus_per_replica=args.replica_gpus,
        max_models=args.max_models,
    )


def check_ray_flags(args: argparse.Namespace) -> None:
    given = [flag for name, flag in _UNSUPPORTED.items() if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not available with --ray yet; replicas serve the WebSocket protocol through one front door")


def replica_settings(args: argparse.Namespace, api_key: str | None) -> dict[str, Any]:
    """The ``serve`` settings every replica applies: the flags, with the API key resolved once by the command."""
    settings = {name: value for name, value in vars(args).items() if name != "func"}
    settings.update(api_key=None, api_key_file=None, resolved_api_key=api_key)
    return settings


def run(args: argparse.Namespace) -> int:
    """Deploy the replicas, serve the front door until Ctrl+C / SIGTERM, then take everything down."""
    from ..server.auth import resolve_api_key
    from ..server.connections import install_log_limits

    check_ray_flags(args)
    options = scale_options_from_args(args)
    local = args.ray_address is None
    if local:
        os.environ.update(LOOPBACK_ENV)  # before ray is imported: it reads this once
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ValueError(f"--ray needs the ray extra: pip install 'policylink[ray]' ({exc})") from None
    from .cluster import RayCluster, serve_forever, start_local_ray

    api_key = resolve_api_key(args.api_key, args.api_key_file)
    serve_args = replica_settings(args, api_key)
    bind_host = args.replica_host or ("127.0.0.1" if local else "0.0.0.0")
    count = f"{options.min_replicas}..{options.max_replicas} (autoscaling)" if options.autoscaling else str(options.replicas)
    print(f"policylink: starting {'a local Ray on 127.0.0.1' if local else f'on the Ray cluster at {args.ray_address}'} with {count} replica(s)", flush=True)
    if local:
        start_local_ray(args.ray_temp_dir)
    else:
        ray.init(address=args.ray_address, log_to_driver=False)
    cluster = RayCluster(serve_args, options, bind_host=bind_host)
    install_log_limits()
    try:
        cluster.deploy()

        def announce(door: Any) -> None:
            what = f"policy {args.policy_path or args.policy_type}" if (args.policy_path or args.policy_type) else "no model (idle: clients send a configure request)"
            print(f"policylink: serving {what} from Ray Serve on ws://{args.host}:{door.port} "
                  f"(health of all replicas: http://{args.host}:{door.port}/healthz); Ctrl+C to stop", flush=True)

        asyncio.run(serve_forever(cluster, args.host, args.port, api_key, on_ready=announce))
    finally:
        cluster.shutdown()
        if local:
            serve.shutdown()
        ray.shutdown()
    print("policylink: server stopped", flush=True)
    return 0
