"""``policylink serve --ray``: a real local Ray (127.0.0.1 only) and Ray Serve, real clients.

Every test starts its own Ray and stops it (``serve.shutdown()``,
``ray.shutdown()``); Ray's temporary files and token live in a folder of the
test's own. Replicas get half a CPU each so that two fit this 2-core machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policylink.rayserve.cluster import LOOPBACK_ENV

os.environ.update(LOOPBACK_ENV)  # before ray is imported (Ray reads it once)
ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
serve = pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402

from policylink import PolicyClient  # noqa: E402
from policylink.cli import build_parser  # noqa: E402
from policylink.client.connection import BlockingConnection  # noqa: E402
from policylink.codec import unpackb  # noqa: E402
from policylink.errors import Unauthorized  # noqa: E402
from policylink.rayserve.background import BackgroundFrontDoor  # noqa: E402
from policylink.rayserve.cluster import RayCluster, ScaleOptions, start_local_ray  # noqa: E402
from policylink.rayserve.run import replica_settings  # noqa: E402

from conftest import POLICYLINK, free_port, wait_healthy, wait_until  # noqa: E402
from lerobot_checkpoints import act_dir  # noqa: E402,F401

pytestmark = pytest.mark.timeout(300)

STATE = {"observation.state": np.zeros(4, np.float32)}


def serve_args(*flags: str, api_key: str | None = None) -> dict[str, Any]:
    """The settings ``policylink serve FLAGS`` would give each replica."""
    return replica_settings(build_parser().parse_args(["serve", *flags]), api_key)


@pytest.fixture
def local_ray() -> Iterator[Path]:
    # A short path: Ray's Unix sockets live under it and such paths are limited to about 100 characters.
    folder = Path(tempfile.mkdtemp(prefix="plray-"))
    start_local_ray(folder, num_cpus=2)
    try:
        yield folder
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def connect_and_see_replica(door: BackgroundFrontDoor, **options: Any) -> tuple[PolicyClient, str]:
    """A new client, and the replica the front door gave it (the one whose relayed count went up)."""
    before = door.relayed()
    client = PolicyClient(door.url, **options)
    after = door.relayed()
    grown = [replica for replica, count in after.items() if count > before.get(replica, 0)]
    assert len(grown) == 1, (before, after)
    return client, grown[0]


def test_clients_on_a_killed_replica_recover_and_the_others_see_no_error(local_ray: Path) -> None:
    cluster = RayCluster(serve_args("--policy.type", "constant", "--policy.action_dim", "4", "--policy.value", "0.25"),
                         ScaleOptions(replicas=2, cpus_per_replica=0.5))
    cluster.deploy()
    with BackgroundFrontDoor(cluster) as door:
        placed = [connect_and_see_replica(door) for _ in range(6)]
        replicas = {replica for _, replica in placed}
        assert len(replicas) == 2, f"Serve put every connection on one replica: {placed}"
        # openpi's own client goes through the same door unchanged.
        openpi = WebsocketClientPolicy(host="127.0.0.1", port=door.port)
        assert np.allclose(openpi.infer(STATE)["actions"], 0.25)
        for client, _ in placed:
            assert client.infer(STATE)["actions"].shape == (16, 4)

        victim = placed[0][1]
        survivors = [client for client, replica in placed if replica != victim]
        victims = [client for client, replica in placed if replica == victim]
        cluster.kill_replica(victim)
        wait_until(lambda: victim not in door.relayed(), "the killed replica's connections to drop", timeout=30)
        for client in survivors:  # unaffected: the same connection, no reconnect, no error
            assert np.allclose(client.infer(STATE)["actions"], 0.25)
            assert client.reconnects == 0
        for client in victims:  # their connection dropped: the next call reconnects through the door to a live replica
            started = time.monotonic()
            assert np.allclose(client.infer(STATE, timeout=20)["actions"], 0.25)
            assert client.reconnects == 1
            assert time.monotonic() - started < 20
        for client, _ in placed:
            client.close()


def test_configure_loads_each_checkpoint_once_per_replica(local_ray: Path, act_dir: Path) -> None:  # noqa: F811
    cluster = RayCluster(serve_args(), ScaleOptions(replicas=2, cpus_per_replica=0.5))  # idle replicas: clients configure
    cluster.deploy()
    obs = {"observation.state": np.zeros(6, np.float32), "observation.images.front": np.zeros((48, 64, 3), np.uint8)}
    with BackgroundFrontDoor(cluster) as door:
        placed = [connect_and_see_replica(door) for _ in range(4)]
        for client, _ in placed:
            assert client.configure(str(act_dir)).action_dim == 6
            assert client.infer(obs)["actions"].shape[1] == 6
        health = asyncio.run(_fresh_health(cluster, {replica for _, replica in placed}))
        for replica, info in health.items():
            assert info["models_loaded"] == 1, f"replica {replica} loaded the checkpoint {info['models_loaded']} times"

        for client, _ in placed:
            client.close()


def test_a_checkpoint_named_at_the_handshake_is_loaded_by_the_replica_serve_picks(local_ray: Path, act_dir: Path) -> None:  # noqa: F811
    cluster = RayCluster(serve_args(api_key="sesame"), ScaleOptions(replicas=2, cpus_per_replica=0.5))
    cluster.deploy()
    key = {"Authorization": "Api-Key sesame"}
    header = {"serve_multiplexed_model_id": str(act_dir), **key}  # Serve's multiplexing header; ?model= works too
    with BackgroundFrontDoor(cluster, api_key="sesame") as door:
        first, home = _raw_connection(door, header)
        health = asyncio.run(_fresh_health(cluster, {home}))
        assert health[home]["models_loaded"] == 1 and health[home]["models"] == [str(act_dir)]
        second, where = _raw_connection(door, key, query=f"?model={act_dir}")
        health = asyncio.run(_fresh_health(cluster, {where}))
        assert health[where]["models_loaded"] == 1  # loaded there once, whichever replica Serve chose
        for connection in (first, second):
            connection.close()

        # The API key guards the replicas and the front door's own pages alike.
        with pytest.raises(Unauthorized):
            PolicyClient(door.url, connect_timeout=10)
        assert "replica_health" not in _get_json(door, "/healthz")
        assert _get_json(door, "/healthz", key)["replicas"] == 2
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get_json(door, "/metrics")
        assert refused.value.code == 401
        request = urllib.request.Request(f"http://127.0.0.1:{door.port}/metrics", headers=key)
        with urllib.request.urlopen(request, timeout=10) as response:
            metrics = response.read().decode()
        assert metrics.count("policylink_models_loaded{replica=") == 2


def _get_json(door: BackgroundFrontDoor, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{door.port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def _fresh_health(cluster: RayCluster, replicas: set[str]) -> dict[str, dict[str, Any]]:
    """Each replica's health once it reports after the configures (heartbeats come every second)."""
    deadline = time.monotonic() + 10
    while True:
        view = await cluster.replicas()
        if all(view.get(replica, {}).get("models_loaded") for replica in replicas) or time.monotonic() > deadline:
            return {replica: view[replica] for replica in replicas}
        await asyncio.sleep(0.2)


def _raw_connection(door: BackgroundFrontDoor, headers: dict[str, str], query: str = "") -> tuple[BlockingConnection, str]:
    before = door.relayed()
    connection = BlockingConnection.open(door.url + "/" + query, timeout=60, headers=headers)
    assert unpackb(connection.recv(timeout=30))["status"] == "idle"
    grown = [replica for replica, count in door.relayed().items() if count > before.get(replica, 0)]
    assert len(grown) == 1
    return connection, grown[0]


def test_the_command_serves_replicas_on_loopback_only_and_stops_on_sigterm() -> None:
    port = free_port()
    pids: list[int] = []
    folder = Path(tempfile.mkdtemp(prefix="plray-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)  # the command sets them itself (the earlier tests' Ray set them in this process)
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--ray", "--replicas", "2", "--replica-cpus", "0.5", "--policy.type", "constant", "--policy.action_dim", "4",
         "--host", "127.0.0.1", "--port", str(port), "--ray-temp-dir", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        health = wait_healthy(port, process, timeout=180)
        deadline = time.monotonic() + 30
        while health["replicas"] < 2 and time.monotonic() < deadline:
            health = wait_healthy(port, process)
        assert health["ready"] and health["replicas"] == 2, health
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            assert client.infer(STATE)["actions"].shape == (16, 4)
        openpi = WebsocketClientPolicy(host="127.0.0.1", port=port)
        assert openpi.infer(STATE)["actions"].shape == (16, 4)

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        replicas_in_metrics = {line.split('replica="')[1].split('"')[0] for line in metrics.splitlines() if line.startswith("policylink_requests_total{")}
        assert len(replicas_in_metrics) >= 1 and all(replicas_in_metrics)

        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        pids = [proc.pid for proc in tree]
        assert len(tree) > 5, "Ray's processes should be children of the command"
        outside = []
        for proc in tree:
            try:
                for connection in proc.net_connections(kind="inet"):
                    if connection.raddr and not ipaddress.ip_address(connection.raddr.ip.removeprefix("::ffff:")).is_loopback:
                        outside.append((proc.name(), connection.laddr, connection.raddr))
            except psutil.NoSuchProcess:
                pass
        assert not outside, f"Ray connections leaving 127.0.0.0/8: {outside}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
        shutil.rmtree(folder, ignore_errors=True)
    assert process.returncode == 0, output
    assert "server stopped" in output
    wait_until(lambda: not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE],
               "Ray's processes to exit with the command", timeout=30)


# -- the command's options (no Ray needed) -------------------------------------


def test_scale_options_become_serve_deployment_options() -> None:
    fixed = ScaleOptions(replicas=3, gpus_per_replica=0.5, max_clients_per_replica=16).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert fixed["max_ongoing_requests"] == 16  # each open connection holds one slot
    scaling = ScaleOptions(min_replicas=0, max_replicas=4, target_clients=2).deployment_options()
    assert "num_replicas" not in scaling
    assert scaling["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas <= --max-replicas"),
        (["--min-replicas", "1"], "needs both --min-replicas and --max-replicas"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--grpc-port", "9000"], "--grpc-port: not available with --ray"),
        (["--replica-gpus", "-1"], "cannot be negative"),
    ],
)
def test_bad_ray_flags_are_refused_before_ray_starts(flags: list[str], message: str) -> None:
    result = subprocess.run([*POLICYLINK, "serve", "--ray", "--policy.type", "constant", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Ray" not in result.stdout  # refused before anything started
