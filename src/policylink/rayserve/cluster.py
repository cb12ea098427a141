"""Start (or join) Ray, deploy the replicas on Ray Serve, and open the front door.

A local Ray instance is kept on the loopback interface: Ray otherwise
replaces 127.0.0.1 with the machine's own network address and runs all its
internal traffic over it. :func:`start_local_ray` therefore sets
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before Ray starts, passes
``_node_ip_address="127.0.0.1"``, starts no dashboard and no Serve HTTP
proxy (clients never go through it), keeps Ray's temporary files in a
folder of its own and gives Ray an authentication token in a private
temporary folder (instead of ``~/.ray``).
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ScaleOptions", "RayCluster", "start_local_ray", "LOOPBACK_ENV"]

logger = logging.getLogger("policylink.rayserve")

#: Set before a local Ray starts: without it Ray swaps 127.0.0.1 for the machine's network address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
APP_NAME = "policylink"
#: The token file this process made for its local Rays.
_our_token_path: str | None = None
DEPLOYMENT_NAME = "PolicyReplica"


@dataclasses.dataclass(frozen=True)
class ScaleOptions:
    """How many replicas, what each gets, and how they scale."""

    #: Replicas when not autoscaling.
    replicas: int = 1
    #: Autoscaling bounds; autoscaling is on when they are given.
    min_replicas: int | None = None
    max_replicas: int | None = None
    #: Autoscaling target: open client connections per replica.
    target_clients: float = 4.0
    #: Most client connections one replica holds (each holds one of Serve's ongoing-request slots for its life).
    max_clients_per_replica: int = 32
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    #: Models one replica keeps for Serve's multiplexed routing.
    max_models: int = 2

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
        if self.autoscaling:
            assert self.min_replicas is not None and self.max_replicas is not None
            if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
                raise ValueError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got {self.min_replicas} and {self.max_replicas}")
        if self.max_clients_per_replica < 1 or self.target_clients <= 0:
            raise ValueError("--max-clients-per-replica must be at least 1 and --target-clients above 0")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise ValueError("--replica-cpus and --replica-gpus cannot be negative")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve deployment options for these settings."""
        actor = {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica}
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_clients_per_replica,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 10.0,
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas or 0,
                "initial_replicas": max(1, self.min_replicas or 0),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_clients,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


def start_local_ray(temp_dir: str | os.PathLike | None = None, num_cpus: int | None = None) -> Path:
    """Start a Ray instance on this machine, on 127.0.0.1 only; returns its temporary folder.

    Call it before anything imports ``ray``: Ray reads the loopback switch
    once, when it is imported.
    """
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: it would bind to the network address; "
                           "start the local Ray before importing ray, or set the variable in the environment")

    folder = Path(temp_dir or tempfile.mkdtemp(prefix="policylink-ray-"))
    folder.mkdir(parents=True, exist_ok=True)
    _use_private_token()
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=str(folder),
        num_cpus=num_cpus,
        log_to_driver=False,
        configure_logging=False,
    )
    return folder


def _use_private_token() -> None:
    """Give Ray a token of this process's own, unless the user chose: Ray would write one into ``~/.ray``.

    Every local Ray this process starts reuses it (Ray's client caches the token for the process's life).
    """
    global _our_token_path
    if _our_token_path is not None or any(name in os.environ for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    folder = Path(tempfile.mkdtemp(prefix="policylink-ray-token-"))
    atexit.register(shutil.rmtree, folder, True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = _our_token_path = str(token)


class RayCluster:
    """The replicas of one ``policylink serve --ray`` on Ray Serve, and their directory.

    ``serve_args`` are the ``policylink serve`` settings every replica
    applies; ``bind_host`` is where replicas listen (127.0.0.1 on one
    machine, ``0.0.0.0`` across machines) and ``advertise_host`` the address
    the front door uses to reach them (default: ``bind_host``, or the
    node's address when binding all interfaces).
    """

    def __init__(self, serve_args: dict[str, Any], options: ScaleOptions, *, bind_host: str = "127.0.0.1", advertise_host: str | None = None) -> None:
        self.serve_args = serve_args
        self.options = options
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.directory_name = f"policylink-directory-{secrets.token_hex(4)}"
        self.handle: Any = None
        self._directory: Any = None

    def deploy(self) -> None:
        """Start the directory and the replicas; returns once Serve reports them running (blocking)."""
        import ray
        from ray import serve

        from .replica import DIRECTORY_NAMESPACE, Directory, replica_deployment

        self._directory = Directory.options(name=self.directory_name, namespace=DIRECTORY_NAMESPACE).remote()  # type: ignore[attr-defined]
        ray.get(self._directory.snapshot.remote(0))  # it is up before a replica looks for it
        serve.start(proxy_location="Disabled")  # clients never use Serve's HTTP proxy
        replica = replica_deployment(
            self.serve_args, directory=self.directory_name, bind_host=self.bind_host,
            advertise_host=self.advertise_host, max_models=self.options.max_models,
        )
        deployment = serve.deployment(name=DEPLOYMENT_NAME, **self.options.deployment_options())(replica)
        self.handle = serve.run(deployment.bind(), name=APP_NAME, route_prefix=None)

    async def open_session(self, peer: str, model_id: str) -> tuple[dict[str, Any], Callable[[], None]]:
        """Ask Serve for a replica for one client connection: its address, and how to end the session."""
        call = self.handle.options(stream=True, multiplexed_model_id=model_id or "").session.remote(peer)
        try:
            address = await call.__anext__()
        except BaseException:
            call.cancel()
            raise
        return address, call.cancel

    async def replicas(self) -> dict[str, dict[str, Any]]:
        """Every replica heard from in the last few seconds, with its address and health."""
        from .replica import HEARTBEAT_S

        return await self._directory.snapshot.remote(3 * HEARTBEAT_S)

    def kill_replica(self, replica: str) -> None:
        """Kill one replica's actor, as a crash would (for tests and failure drills); Serve starts a new one."""
        import ray

        names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                 if actor["namespace"] == "serve" and actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#") and actor["name"].endswith(f"#{replica}")]
        if len(names) != 1:
            raise LookupError(f"no single running replica {replica!r}: {names}")
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Blocking variant of :meth:`replicas`."""
        import ray

        from .replica import HEARTBEAT_S

        return ray.get(self._directory.snapshot.remote(3 * HEARTBEAT_S))

    def shutdown(self) -> None:
        from ray import serve

        try:
            serve.delete(APP_NAME)
        except Exception:
            logger.debug("deleting the Serve application failed", exc_info=True)


async def serve_forever(cluster: RayCluster, host: str, port: int, api_key: str | None, on_ready: Callable[[Any], None] | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Run the front door for ``cluster`` until SIGINT/SIGTERM (or ``stop``)."""
    import signal

    from .frontdoor import FrontDoor

    door = FrontDoor(cluster.open_session, cluster.replicas, host, port, api_key=api_key)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    await door.start()
    try:
        if on_ready:
            on_ready(door)
        await stop.wait()
    finally:
        await door.close()
