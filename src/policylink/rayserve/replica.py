"""One Ray Serve replica: policylink's own engine and WebSocket server, on a port of its own.

Ray Serve places the replicas (CPUs, GPUs, fractions of a GPU), restarts
one that dies or fails its health check, and scales their number. Clients'
bytes do not go through Serve: the front door asks Serve for a replica once
per connection (:meth:`session`, a streaming call that stays open for the
connection's life, so Serve counts each connection as one ongoing request
for routing and autoscaling), then relays the connection to that replica's
own port.

Every replica reports its address and health to the :class:`Directory`
actor about once a second; the front door reads it for ``/healthz`` and
``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import ray
from ray import serve

from ..server.background import BackgroundServer

__all__ = ["Directory", "replica_deployment", "DIRECTORY_NAMESPACE", "HEARTBEAT_S"]

logger = logging.getLogger("policylink.rayserve")

#: Ray namespace of the directory actor.
DIRECTORY_NAMESPACE = "policylink"
#: How often a replica reports to the directory (seconds).
HEARTBEAT_S = 1.0


@ray.remote(num_cpus=0)
class Directory:
    """Where replicas say where they listen and how they are; the front door reads it."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def beat(self, replica: str, info: dict[str, Any]) -> None:
        self._entries[replica] = (time.monotonic(), info)

    def leave(self, replica: str) -> None:
        self._entries.pop(replica, None)

    def snapshot(self, max_age_s: float) -> dict[str, dict[str, Any]]:
        """The replicas heard from within ``max_age_s`` seconds (a dead one drops out)."""
        now = time.monotonic()
        return {replica: info for replica, (seen, info) in self._entries.items() if now - seen <= max_age_s}


def replica_deployment(serve_args: dict[str, Any], *, directory: str, bind_host: str, advertise_host: str | None, max_models: int) -> type:
    """The replica class for these ``policylink serve`` settings (``max_models`` sizes Serve's multiplexing)."""

    class PolicyReplica:
        """policylink's server for one replica; Serve calls :meth:`session` once per client connection."""

        def __init__(self) -> None:
            import argparse

            self._stop = threading.Event()

            from ..cli.serve import engine_from_args, policy_from_args
            from ..server.auth import ApiKey

            args = argparse.Namespace(**serve_args)
            engine = engine_from_args(args, policy_from_args(args))
            engine.auth = ApiKey(serve_args.get("resolved_api_key"))  # resolved once by the command, for every replica
            self.server = BackgroundServer(engine, bind_host, 0, max_message_bytes=int(args.max_message_mb * 2**20)).start()
            self.replica = serve.get_replica_context().replica_id.unique_id
            host = advertise_host or (bind_host if bind_host not in ("0.0.0.0", "::") else ray.util.get_node_ip_address())
            self.address = {"replica": self.replica, "host": host, "port": self.server.port}
            self._directory = ray.get_actor(directory, namespace=DIRECTORY_NAMESPACE)
            self._beat()
            threading.Thread(target=self._heartbeat, name="policylink-heartbeat", daemon=True).start()
            logger.info("replica %s serving on %s:%d", self.replica, host, self.server.port)

        async def session(self, peer: str) -> Any:
            """Where to relay one client connection; stays open (one ongoing request) until the front door cancels it."""
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.load(model_id)
            yield self.address
            await asyncio.Event().wait()

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def load(self, model_id: str) -> str:
            """Load checkpoint ``model_id`` into this replica's model cache (Serve then routes its clients here)."""
            await asyncio.to_thread(self.server.engine.preload, {"policy_path": model_id})
            return model_id

        def check_health(self) -> None:
            """Serve's health check: the replica's server thread must still run."""
            if not self.server.running:
                raise RuntimeError(f"policylink server of replica {self.replica} stopped")

        def health(self) -> dict[str, Any]:
            return {**self.address, **self.server.ws.health(detailed=True)}

        def _beat(self) -> None:
            self._directory.beat.remote(self.replica, self.health())

        def _heartbeat(self) -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self._beat()
                except Exception:  # the directory is gone: the deployment is being torn down
                    return

        def __del__(self) -> None:
            # Serve calls this when it stops the replica; a half-built one has less to stop.
            self._stop.set()
            try:
                if hasattr(self, "_directory"):
                    self._directory.leave.remote(self.replica)
                if hasattr(self, "server"):
                    self.server.stop()
            except Exception:
                pass

    return PolicyReplica
