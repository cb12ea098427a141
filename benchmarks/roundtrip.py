"""Round trip on 127.0.0.1 for a typical observation, per client/server pair.

Observation: three 224x224x3 uint8 cameras + a 14-d state; reply: a 50x14
chunk. Rows: policylink client <-> policylink server, openpi-client <->
policylink server, openpi-client <-> openpi's reference server design, and
a raw TCP floor moving the same bytes with no encoding.

    .venv/bin/python benchmarks/roundtrip.py [--requests 300]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from websockets.sync.client import connect

from _baselines import RawTcpClient
from _process import baseline_server, policylink_server
from _report import percentile_ms, write_section
from policylink import PolicyClient
from policylink.codec import packb


def benchmark_observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obs = {f"observation.images.{cam}": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for cam in ("top", "left_wrist", "right_wrist")}
    obs["observation.state"] = rng.standard_normal(14).astype(np.float32)
    return obs


def measure(call: Callable[[], object], requests: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args()

    obs = benchmark_observation()
    payload = packb(obs)
    reply_bytes = len(packb({"actions": np.zeros((50, 14), np.float32), "server_timing": {"infer_ms": 0.0, "queue_ms": 0.0, "prev_total_ms": 0.0}}))
    serve_flags = ("--policy.type", "constant", "--policy.value", "0.5", "--policy.action_dim", "14", "--policy.horizon", "50")
    rows: list[tuple[str, list[float]]] = []

    with policylink_server(*serve_flags) as port:
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            rows.append(("policylink client -> policylink server", measure(lambda: client.infer(obs), args.requests)))
        openpi = WebsocketClientPolicy(host="127.0.0.1", port=port)
        rows.append(("openpi-client -> policylink server", measure(lambda: openpi.infer(obs), args.requests)))
    with baseline_server("openpi-style") as port:
        openpi = WebsocketClientPolicy(host="127.0.0.1", port=port)
        rows.append(("openpi-client -> openpi reference design server", measure(lambda: openpi.infer(obs), args.requests)))
    with baseline_server("ws-echo", reply_bytes) as port, connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        rows.append(("websockets library alone (same bytes, echo, no encoding)", measure(lambda: (ws.send(payload), ws.recv()), args.requests)))
    with baseline_server("raw-tcp", reply_bytes) as port:
        raw = RawTcpClient("127.0.0.1", port)
        rows.append(("raw TCP floor (same bytes, no encoding)", measure(lambda: raw.roundtrip(payload), args.requests)))
        raw.close()

    floor_p50 = percentile_ms(rows[-1][1], 50)
    lines = [
        f"Request {len(payload) / 1024:.0f} KiB (3 x 224x224x3 uint8 + 14-d state), reply {reply_bytes / 1024:.1f} KiB (50x14 float32); "
        f"{args.requests} requests after 20 warm-up, one client at a time, every server in its own process.",
        "",
        "| pair | p50 ms | p99 ms | p50 / raw floor |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, samples in rows:
        p50, p99 = percentile_ms(samples, 50), percentile_ms(samples, 99)
        lines.append(f"| {name} | {p50:.2f} | {p99:.2f} | {p50 / floor_p50:.1f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("Round trip (WebSocket)", table)


if __name__ == "__main__":
    main()
