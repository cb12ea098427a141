"""``serve --ray`` on this machine: the front door's extra round trip, 1 vs 2 replicas, recovery after a kill.

A local Ray on 127.0.0.1 (no dashboard, no Serve HTTP proxy) with replicas
of policylink's own server behind the front door:

- Round trip: ``PolicyClient`` through the front door against the same
  replica's own port (a constant policy, so only transport shows), for a
  441 KiB observation (3 x 224x224 cameras + state) and a 10 KiB one.
- Throughput: 4 openpi clients, each as fast as replies come, against
  ``policylink serve --ray`` (its own process and Ray) with 1 and 2
  replicas of a default-size ACT (one 96x128 camera, random weights), one
  CPU each (Ray gives each replica one torch thread).
- Recovery: a client on a replica that is killed (``ray.kill``): time from
  the kill to its next answered request, reconnect included.

    .venv/bin/python benchmarks/ray_serve.py [--seconds 15] [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

from policylink.rayserve.cluster import LOOPBACK_ENV

os.environ.update(LOOPBACK_ENV)  # before ray is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import ray  # noqa: E402
from ray import serve  # noqa: E402

from _process import policylink_server  # noqa: E402
from _report import percentile_ms, publish  # noqa: E402
from roundtrip import benchmark_observation, round_robin  # noqa: E402
from throughput import act_observation, build_act, load  # noqa: E402

from policylink import PolicyClient  # noqa: E402
from policylink.cli import build_parser  # noqa: E402
from policylink.rayserve.background import BackgroundFrontDoor  # noqa: E402
from policylink.rayserve.cluster import RayCluster, ScaleOptions, start_local_ray  # noqa: E402
from policylink.rayserve.run import replica_settings  # noqa: E402

CLIENTS = 4
IMAGE = (96, 128)
TARGET_EXTRA_MS, TARGET_SPEEDUP, TARGET_RECOVERY_S = 1.0, 1.8, 2.0


def serve_args(*flags: str) -> dict:
    return replica_settings(build_parser().parse_args(["serve", *flags]), None)


def deployed(flags: tuple[str, ...], replicas: int) -> RayCluster:
    cluster = RayCluster(serve_args(*flags), ScaleOptions(replicas=replicas, cpus_per_replica=1))
    cluster.deploy()
    return cluster


def replica_port(cluster: RayCluster) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = cluster.snapshot()
        if view:
            return next(iter(view.values()))["port"]
        time.sleep(0.2)
    raise RuntimeError("no replica reported its port")


def round_trips(requests: int) -> list[str]:
    constant = ("--policy.type", "constant", "--policy.action_dim", "14", "--policy.horizon", "50", "--policy.value", "0.5")
    cluster = deployed(constant, 1)
    large = benchmark_observation()
    small = {"observation.images.top": np.zeros((56, 60, 3), np.uint8), "observation.state": np.zeros(14, np.float32)}  # about 10 KiB
    with BackgroundFrontDoor(cluster) as door:
        port = replica_port(cluster)
        via, direct = PolicyClient(door.url), PolicyClient(f"ws://127.0.0.1:{port}")
        pairs = []
        for label, obs in (("441 KiB", large), ("10 KiB", small)):
            pairs += [(f"{label}: direct to the replica's port", lambda obs=obs: direct.infer(obs)),
                      (f"{label}: through the front door", lambda obs=obs: via.infer(obs))]
        rows = round_robin(pairs, requests)
        via.close()
        direct.close()
    cluster.shutdown()
    by_name = dict(rows)
    lines = ["| path | p50 ms | p99 ms |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {percentile_ms(samples, 50):.2f} | {percentile_ms(samples, 99):.2f} |" for name, samples in rows]
    extra = {label: percentile_ms(by_name[f"{label}: through the front door"], 50) - percentile_ms(by_name[f"{label}: direct to the replica's port"], 50)
             for label in ("441 KiB", "10 KiB")}
    lines += ["", f"- Target: the front door adds <= {TARGET_EXTRA_MS:.0f} ms for 441 KiB: "
              f"{'met' if extra['441 KiB'] <= TARGET_EXTRA_MS else 'NOT met'} (+{extra['441 KiB']:.2f} ms p50; +{extra['10 KiB']:.2f} ms for 10 KiB). "
              "Serve's own HTTP proxy in front of a WebSocket route costs about 4.5 ms here (issue 16's measurement)."]
    return lines


def throughput(checkpoint: Path, seconds: float) -> list[str]:
    """Rows from the real command (``policylink serve --ray`` in its own process), so the front door has its own interpreter."""
    rates = {}
    lines = ["| replicas | clients | requests/s | p50 ms | p99 ms | machine CPU busy |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for replicas in (1, 2):
        flags = ("--ray", "--replicas", str(replicas), "--replica-cpus", "1", "--policy.path", str(checkpoint), "--device", "cpu")
        with policylink_server(*flags, timeout=300) as port:
            wait_for_replicas(port, replicas)
            psutil.cpu_percent()  # starts the measurement window
            rate, latencies, _, errors = load(port, CLIENTS, seconds, 10_000, lambda i: act_observation(i, IMAGE), True, 60.0)
            busy = psutil.cpu_percent()
        if errors:
            raise RuntimeError(f"{replicas} replicas: {errors[0]!r}")
        rates[replicas] = rate
        lines.append(f"| {replicas} | {CLIENTS} | {rate:.2f} | {percentile_ms(latencies, 50):.0f} | {percentile_ms(latencies, 99):.0f} | {busy:.0f}% |")
    speedup = rates[2] / rates[1]
    cores = os.cpu_count() or 1
    lines += ["", f"- Target: 2 replicas >= {TARGET_SPEEDUP}x one replica's throughput where the cores allow: "
              f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'} ({speedup:.2f}x). This machine has {cores} cores: two replicas "
              "of one torch thread each would need both, but the clients (encoding and sending), the front door and Ray's own "
              "processes run on the same two; the CPU column shows how busy the whole machine was during each row."]
    return lines


def wait_for_replicas(port: int, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            if json.loads(response.read()).get("replicas") == count:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{count} replicas did not report within {timeout:.0f} s")


def recovery(trials: int) -> list[str]:
    constant = ("--policy.type", "constant", "--policy.action_dim", "14", "--policy.horizon", "50")
    cluster = deployed(constant, 2)
    obs = {"observation.state": np.zeros(14, np.float32)}
    times = []
    killed: set[str] = set()
    with BackgroundFrontDoor(cluster) as door:
        for _ in range(trials):
            before = door.relayed()
            client = PolicyClient(door.url)
            victim = next(replica for replica, count in door.relayed().items() if count > before.get(replica, 0))
            client.infer(obs)
            killed_at = time.monotonic()
            cluster.kill_replica(victim)
            killed.add(victim)
            while True:  # the first call may still reach the dying replica; each call reconnects when it sees the drop
                try:
                    client.infer(obs, timeout=10)
                    if client.reconnects:
                        break
                except Exception:
                    pass
            times.append(time.monotonic() - killed_at)
            client.close()
            deadline = time.monotonic() + 60
            while len(set(cluster.snapshot()) - killed) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)  # Serve replaces the killed replica before the next trial (a dead one stays listed for 3 s)
    cluster.shutdown()
    worst = max(times)
    return [
        "| trial | kill -> next answered request (s) |", "| ---: | ---: |",
        *[f"| {index + 1} | {value:.2f} |" for index, value in enumerate(times)],
        "", f"- Target: clients of a killed replica back in <= {TARGET_RECOVERY_S:.0f} s: {'met' if worst <= TARGET_RECOVERY_S else 'NOT met'} "
        f"(worst {worst:.2f} s). The others' connections are untouched (tests/test_rayserve.py).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="per throughput row (default: 15)")
    parser.add_argument("--requests", type=int, default=300, help="per round-trip row (default: 300)")
    parser.add_argument("--trials", type=int, default=3, help="replica kills (default: 3)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="plray-"))
    try:
        # The command starts its own Ray: measured first, before this process starts one.
        rates = throughput(build_act(folder / "act", IMAGE), args.seconds)
        start_local_ray(folder / "ray", num_cpus=os.cpu_count())
        sections = [
            ("Round trip, direct vs through the front door (1 replica)", round_trips(args.requests)),
            (f"Throughput, default-size ACT on CPU, {CLIENTS} clients (`policylink serve --ray` in its own process)", rates),
            ("Recovery after a replica is killed (2 replicas)", recovery(args.trials)),
        ]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    body = ["Local Ray on 127.0.0.1 (no dashboard, no Serve HTTP proxy); each replica is policylink's own server on its own port, one CPU each; "
            "clients connect to the front door, which relays each connection to the replica Serve picks.", ""]
    for title, lines in sections:
        body += [f"**{title}**", "", *lines, ""]
    publish("Ray Serve (serve --ray)", "\n".join(body), write=not args.no_write)


if __name__ == "__main__":
    main()
