"""Many clients, one server: requests/s and latency with batching on and off.

A real LeRobot ACT policy (default architecture: ResNet-18 backbone,
512-d transformer, chunk 100; random weights, saved with LeRobot's own code)
is served by ``policylink serve`` in its own process. 1, 2, 4, 8 and 16
clients each send observations (one 224x224 camera + 6-d state) as fast as
replies come back, for a bounded time. Rows: batching on (``--max-batch 16``),
batching off (``--max-batch 1``), and openpi's reference server design
(inference inside the event loop, one request at a time) as a baseline.

    .venv/bin/python benchmarks/throughput.py [--device cpu|cuda] [--seconds 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _process import baseline_server, policylink_server  # noqa: E402
from _report import percentile_ms, write_section  # noqa: E402

CLIENTS = (1, 2, 4, 8, 16)
NOTE = (
    "On this 2-core CPU the forward pass itself is the bottleneck, so batching can only win what a larger matrix multiply saves (about 1.5x at 4-8 clients, while batching off and the reference design stay flat). The issue's GPU target (16 clients at 6x the single-client rate, p99 under 2x single-client latency) needs a GPU: this session had no device machine, so it is not measured yet; run `python benchmarks/throughput.py --device cuda`."
)


def build_act(directory: Path, image_size: tuple[int, int]) -> Path:
    """A default-size ACT with random weights, saved as a training run would."""
    from lerobot.policies.act.configuration_act import ACTConfig

    from lerobot_checkpoints import dataset_stats, features, save_checkpoint

    inputs, outputs = features(6, 6, {"front": image_size})
    config = ACTConfig(input_features=inputs, output_features=outputs, device="cpu", pretrained_backbone_weights=None)
    return save_checkpoint(config, directory, dataset_stats(6, 6, {"front": None}))


def observation(seed: int, image_size: tuple[int, int]) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation.state": rng.standard_normal(6).astype(np.float32),
        "observation.images.front": rng.integers(0, 256, (*image_size, 3), dtype=np.uint8),
    }


def load(port: int, clients: int, seconds: float, max_requests: int, image_size: tuple[int, int]) -> tuple[float, list[float]]:
    """``clients`` threads each infer until time or request budget runs out; returns (req/s, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    deadline_box: list[float] = []

    def client(index: int) -> None:
        policy = WebsocketClientPolicy(host="127.0.0.1", port=port)
        obs = observation(index, image_size)
        policy.infer(obs)  # warm the connection
        barrier.wait()
        mine = []
        while time.monotonic() < deadline_box[0] and len(mine) < max_requests:
            start = time.perf_counter()
            policy.infer(obs)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline_box.append(time.monotonic() + seconds)
    started = time.monotonic()
    barrier.wait()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per row (default: 8)")
    parser.add_argument("--max-requests", type=int, default=2000, help="per client and row (default: 2000)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(224, 224))
    parser.add_argument("--clients", type=int, nargs="*", default=list(CLIENTS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    image_size = tuple(args.image_size)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(build_act(Path(tmp) / "act", image_size))
        setups = [
            ("policylink, batching on (max 16)", lambda: policylink_server("--policy.path", checkpoint, "--device", args.device, "--max-batch", "16", "--batch-timeout-ms", "2")),
            ("policylink, batching off", lambda: policylink_server("--policy.path", checkpoint, "--device", args.device, "--max-batch", "1")),
            ("openpi reference design (baseline)", lambda: baseline_server("openpi-style", 0, checkpoint, args.device)),
        ]
        rows = []
        for name, start in setups:
            with start() as port:
                for clients in args.clients:
                    rate, latencies = load(port, clients, args.seconds, args.max_requests, image_size)
                    rows.append((name, clients, rate, percentile_ms(latencies, 50), percentile_ms(latencies, 99)))
                    print(f"{name:40s} clients={clients:2d} {rate:8.1f} req/s p50 {rows[-1][3]:8.1f} ms p99 {rows[-1][4]:8.1f} ms", flush=True)

    single = {name: rate for name, clients, rate, *_ in rows if clients == min(args.clients)}
    lines = [
        f"Policy: LeRobot ACT, default architecture (ResNet-18, 512-d, chunk 100), random weights, device `{args.device}`; "
        f"observation one {image_size[0]}x{image_size[1]} camera + 6-d state; openpi-client `WebsocketClientPolicy` clients "
        f"in one process, server in its own; {args.seconds:g} s per row.",
        "",
        "| server | clients | requests/s | x single client | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, clients, rate, p50, p99 in rows:
        lines.append(f"| {name} | {clients} | {rate:.1f} | {rate / single[name]:.1f}x | {p50:.1f} | {p99:.1f} |")
    lines += ["", NOTE]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(f"Throughput, many clients ({args.device})", table)


if __name__ == "__main__":
    main()
