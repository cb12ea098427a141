"""Many clients, one server: requests/s and latency with batching on and off, for ACT and SmolVLA.

Two real LeRobot policies at LeRobot's default sizes (random weights, the
configuration built locally, saved with LeRobot's own code) are each served
by ``policylink serve`` in its own process, on 127.0.0.1:

- ACT (ResNet-18 backbone, 512-d transformer, chunk 100): one 224x224 camera
  + 6-d state;
- SmolVLA (SmolVLM2-500M architecture built offline, see ``inference.py``):
  front + wrist 480x640 cameras + 6-d state + a task prompt; clients rotate
  over a few prompts of different lengths (the server pads them when it
  batches requests from different clients).

1, 2, 4, 8, 16 and 32 openpi-client ``WebsocketClientPolicy`` clients each
send observations as fast as replies come back. Each row is bounded in time
and count: a client starts no new request once the row's time is up or its
request budget is spent, and the row ends when the requests already sent have
been answered (that drain counts in requests/s). Rows: batching on
(``--max-batch 16``), batching off (``--max-batch 1``), and openpi's reference
server design (inference inside the event loop, one request at a time) as a
baseline. Batching on is measured twice: with requests prepared on their own
thread while the batch before runs (the default) and with ``--no-overlap``. A SmolVLA inference takes seconds on a CPU, so SmolVLA rows have
their own, smaller budget (``--smolvla-seconds``, ``--smolvla-max-requests``).

    .venv/bin/python benchmarks/throughput.py [--device cpu|cuda] [--policies act smolvla]
    .venv/bin/python benchmarks/throughput.py --device cuda --smolvla-seconds 10 --smolvla-max-requests 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _process import baseline_server, policylink_server  # noqa: E402
from _report import percentile_ms, publish  # noqa: E402

CLIENTS = (1, 2, 4, 8, 16, 32)
MAX_BATCH = 16
#: Prompts the SmolVLA clients rotate over (client i sends PROMPTS[i % len]); the locally built tokenizer knows these words.
PROMPTS = ("pick up the cube", "stack the red cube on the blue cube", "place the green cube", "lift the blue cube", "sort the cubes")
#: The issue's GPU target, at 16 clients with batching on.
TARGET_CLIENTS, TARGET_SPEEDUP, TARGET_P99 = 16, 6.0, 2.0


def build_act(directory: Path, image_size: tuple[int, int]) -> Path:
    """A default-size ACT with random weights, saved as a training run would."""
    from lerobot.policies.act.configuration_act import ACTConfig

    from lerobot_checkpoints import dataset_stats, features, save_checkpoint

    inputs, outputs = features(6, 6, {"front": image_size})
    config = ACTConfig(input_features=inputs, output_features=outputs, device="cpu", pretrained_backbone_weights=None)
    return save_checkpoint(config, directory, dataset_stats(6, 6, {"front": None}))


def build_smolvla(root: Path) -> Path:
    """A default-size SmolVLA (inference.py's case: its config and locally built SmolVLM2-500M backbone), random weights."""
    from inference import CASES, _smolvla

    from lerobot_checkpoints import dataset_stats, features, save_checkpoint

    case = CASES["smolvla"]
    inputs, outputs = features(case["dim"], case["dim"], case["cameras"])
    root.mkdir(parents=True, exist_ok=True)
    config = _smolvla(inputs, outputs, root)
    config.device = "cpu"
    return save_checkpoint(config, root / "checkpoint", dataset_stats(case["dim"], case["dim"], case["cameras"]))


def act_observation(index: int, image_size: tuple[int, int]) -> dict[str, Any]:
    rng = np.random.default_rng(index)
    return {
        "observation.state": rng.standard_normal(6).astype(np.float32),
        "observation.images.front": rng.integers(0, 256, (*image_size, 3), dtype=np.uint8),
    }


def smolvla_observation(index: int) -> dict[str, Any]:
    from inference import CASES

    case = CASES["smolvla"]
    rng = np.random.default_rng(index)
    obs: dict[str, Any] = {f"observation.images.{name}": rng.integers(0, 256, (*case["frame"], 3), dtype=np.uint8) for name in case["cameras"]}
    obs["observation.state"] = rng.standard_normal(case["dim"]).astype(np.float32)
    obs["task"] = PROMPTS[index % len(PROMPTS)]
    return obs


def load(port: int, clients: int, seconds: float, max_requests: int, make_obs, warm_each: bool,
         drain_limit_s: float) -> tuple[float, list[float], float, list[BaseException]]:
    """``clients`` threads each infer until ``seconds`` pass or ``max_requests`` are done.

    Returns (req/s, latencies, row seconds, errors of the clients that failed: their completed requests still count).

    Requests already sent when time is up are waited for (at most ``drain_limit_s`` more): they count, in
    the rate and in the latencies. ``warm_each``: every client sends one untimed request first.
    """
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline_box: list[float] = []
    # The row starts when every client is connected (and warmed): the barrier's action sets the time it ends.
    barrier = threading.Barrier(clients + 1, action=lambda: deadline_box.append(time.monotonic() + seconds))

    def client(index: int) -> None:
        mine: list[float] = []
        try:
            policy = WebsocketClientPolicy(host="127.0.0.1", port=port)
            obs = make_obs(index)
            if warm_each:
                policy.infer(obs)
            barrier.wait(timeout=600)
            while time.monotonic() < deadline_box[0] and len(mine) < max_requests:
                start = time.perf_counter()
                reply = policy.infer(obs)
                if "actions" not in reply:
                    raise RuntimeError(f"reply without actions: {sorted(reply)}")
                mine.append(time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - a failed client is reported in its row
            barrier.abort()
            with lock:
                errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(timeout=600)
    except threading.BrokenBarrierError:
        pass
    started = deadline_box[0] - seconds if deadline_box else time.monotonic()
    end = started + seconds + drain_limit_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    elapsed = time.monotonic() - started
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"{clients} clients: requests still unanswered {seconds + drain_limit_s:.0f} s after the row started")
    return len(latencies) / elapsed, latencies, elapsed, errors


def setups(checkpoint: str, device: str) -> list[tuple[str, Any]]:
    return [
        (f"policylink, batching on (max {MAX_BATCH})",
         lambda: policylink_server("--policy.path", checkpoint, "--device", device, "--max-batch", str(MAX_BATCH), "--batch-timeout-ms", "2")),
        (f"policylink, batching on (max {MAX_BATCH}), --no-overlap",
         lambda: policylink_server("--policy.path", checkpoint, "--device", device, "--max-batch", str(MAX_BATCH), "--batch-timeout-ms", "2",
                                   "--no-overlap")),
        ("policylink, batching off", lambda: policylink_server("--policy.path", checkpoint, "--device", device, "--max-batch", "1")),
        ("openpi reference design (baseline)", lambda: baseline_server("openpi-style", 0, checkpoint, device)),
    ]


def target_line(policy: str, rows: list[tuple], device: str) -> str:
    """The issue's GPU target for this policy: checked on a GPU, said to be unmeasured otherwise."""
    target = (f"GPU target: {TARGET_CLIENTS} clients with batching on at >= {TARGET_SPEEDUP:g}x the single-client rate, "
              f"p99 under {TARGET_P99:g}x the single-client latency (read strictly: its p50)")
    if not device.startswith("cuda"):
        return f"{policy}: {target}. Not measured: this run is on `{device}` (no GPU was lent to this task), so the target is still open."
    on = {clients: (rate, p50, p99) for server, clients, _, rate, p50, p99, _ in rows if server == f"policylink, batching on (max {MAX_BATCH})"}
    if 1 not in on or TARGET_CLIENTS not in on:
        return f"{policy}: {target}. Not checked: this run lacks the 1- or {TARGET_CLIENTS}-client row."
    (rate1, p50_1, _), (rate16, _, p99_16) = on[1], on[TARGET_CLIENTS]
    speedup, ratio = rate16 / rate1, p99_16 / p50_1
    verdict = "met" if speedup >= TARGET_SPEEDUP and ratio < TARGET_P99 else "NOT met"
    return f"{policy}: {target}. {verdict} on `{device}`: {speedup:.1f}x the rate, p99 {ratio:.1f}x the single-client p50."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policies", nargs="*", default=["act", "smolvla"], choices=["act", "smolvla"])
    parser.add_argument("--clients", type=int, nargs="*", default=list(CLIENTS), help="client counts, both policies (default: 1 2 4 8 16 32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="ACT: time per row in which clients start requests (default: 5)")
    parser.add_argument("--max-requests", type=int, default=2000, help="ACT: requests per client and row (default: 2000)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(224, 224), help="ACT's camera (default: 224 224)")
    parser.add_argument("--smolvla-seconds", type=float, default=4.0, help="SmolVLA: time per row in which clients start requests (default: 4)")
    parser.add_argument("--smolvla-max-requests", type=int, default=2, help="SmolVLA: requests per client and row (default: 2)")
    parser.add_argument("--smolvla-clients", type=int, nargs="*", default=None, help="SmolVLA's client counts (default: --clients)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    image_size = tuple(args.image_size)
    server_threads = torch.get_num_threads()  # the servers' processes keep torch's default (lerobot_checkpoints sets 2 here)
    load_before, run_started = os.getloadavg()[0], time.monotonic()

    specs = {
        "act": {"clients": args.clients, "seconds": args.seconds, "max_requests": args.max_requests, "warm_each": True, "drain": 120.0,
                "obs": lambda i: act_observation(i, image_size)},
        "smolvla": {"clients": args.smolvla_clients or args.clients, "seconds": args.smolvla_seconds, "max_requests": args.smolvla_max_requests,
                    # one untimed request per client would cost clients x an inference per row; the server warmed up when it loaded
                    "warm_each": False, "drain": 1200.0, "obs": smolvla_observation},
    }
    results: dict[str, list[tuple]] = {}
    failed: dict[tuple[str, str, int], list[BaseException]] = {}
    with tempfile.TemporaryDirectory(prefix="policylink-throughput-") as tmp:
        for policy in args.policies:
            spec = specs[policy]
            built = time.monotonic()
            checkpoint = str(build_act(Path(tmp) / "act", image_size) if policy == "act" else build_smolvla(Path(tmp) / "smolvla"))
            from lerobot_checkpoints import release_memory

            release_memory()
            print(f"{policy}: built in {time.monotonic() - built:.0f} s", flush=True)
            rows = results[policy] = []
            for name, start in setups(checkpoint, args.device):
                with start() as port:
                    warm = WebsocketClientPolicy(host="127.0.0.1", port=port)  # one untimed request per server first
                    warm.infer(spec["obs"](0))
                    warm._ws.close()  # openpi-client's policy has no close()
                    for clients in spec["clients"]:
                        rate, latencies, elapsed, errors = load(port, clients, spec["seconds"], spec["max_requests"], spec["obs"],
                                                                spec["warm_each"], spec["drain"])
                        rows.append((name, clients, len(latencies), rate, percentile_ms(latencies, 50), percentile_ms(latencies, 99), elapsed))
                        failed[(policy, name, clients)] = errors
                        print(f"{policy:8s} {name:36s} clients={clients:2d} requests={len(latencies):5d} in {elapsed:6.1f} s "
                              f"{rate:8.2f} req/s p50 {rows[-1][4]:9.1f} ms p99 {rows[-1][5]:9.1f} ms failed clients {len(errors)}", flush=True)

    from inference import CASES

    described = {
        "act": (f"**ACT**, LeRobot's default architecture (ResNet-18, 512-d, chunk 100), random weights; observation one "
                f"{image_size[0]}x{image_size[1]} camera + 6-d state. Rows: clients start requests for {args.seconds:g} s "
                f"(at most {args.max_requests} each), after one untimed request per client."),
        "smolvla": (f"**SmolVLA**: {CASES['smolvla']['what']}; random weights, backbone config and tokenizer built locally "
                    f"(as in the inference-latency section); client frames 480x640, resized by the server. Client i sends prompt "
                    f"i mod {len(PROMPTS)} of: " + ", ".join(f'"{p}"' for p in PROMPTS) + " (batched prompts are padded). "
                    f"Rows: clients start requests for {args.smolvla_seconds:g} s, at most {args.smolvla_max_requests} each, "
                    "no untimed warm-up request per client (the server warms up once when it loads)."),
    }
    parts = [
        f"Device `{args.device}`, float32; each server in its own process on 127.0.0.1 with torch's default {server_threads} CPU threads "
        f"({os.cpu_count()} CPUs); openpi-client `WebsocketClientPolicy` clients, one thread each, all in the benchmark's process. "
        f"Servers: policylink with batching across clients on (`--max-batch {MAX_BATCH} --batch-timeout-ms 2`), with requests prepared "
        "while the batch before runs (the default) and with `--no-overlap` (prepared inside their batch), policylink with "
        "batching off (`--max-batch 1`), and openpi's reference design (inference called inside the WebSocket handler, on the "
        "event loop: one request at a time) as the baseline. A row ends when every request sent has been answered; `requests` "
        "is how many completed, `failed clients` how many clients lost their connection or got an error (listed below), `seconds` the row's wall-clock time including that drain; requests/s = requests / seconds. "
        "`x single client` is against the same server's 1-client row. Each server answers one untimed request before its rows.",
    ]
    for policy, rows in results.items():
        single = {name: rate for name, clients, _, rate, *_ in rows if clients == min(specs[policy]["clients"])}
        parts += ["", described[policy], "",
                  "| server | clients | failed clients | requests | seconds | requests/s | x single client | p50 ms | p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, clients, count, rate, p50, p99, elapsed in rows:
            parts.append(f"| {name} | {clients} | {len(failed[(policy, name, clients)])} | {count} | {elapsed:.1f} | {rate:.2f} | {rate / single[name] if single[name] else float('nan'):.1f}x | {p50:.1f} | {p99:.1f} |")

    notes = []
    for policy, rows in results.items():
        best = max((r for r in rows if r[0] == f"policylink, batching on (max {MAX_BATCH})"), key=lambda r: r[3], default=None)
        single = next((r for r in rows if r[0] == best[0] and r[1] == min(specs[policy]["clients"])), None) if best else None
        if best and single:
            notes.append(f"{policy}: batching on peaks at {best[3]:.2f} req/s with {best[1]} clients, {best[3] / single[3]:.1f}x its "
                         f"single-client rate; batching off and the baseline run one forward pass at a time.")
    for policy, rows in results.items():
        on = {r[1]: r for r in rows if r[0] == f"policylink, batching on (max {MAX_BATCH})"}
        flat = {r[1]: r for r in rows if r[0].endswith("--no-overlap")}
        pairs = [f"{n} clients {on[n][3]:.2f} vs {flat[n][3]:.2f} req/s ({on[n][3] / flat[n][3]:.2f}x, p50 {on[n][4]:.0f} vs {flat[n][4]:.0f} ms)"
                 for n in sorted(on) if n in flat and flat[n][3] > 0 and n > 1]
        if pairs:
            notes.append(f"{policy}, requests prepared while the batch before runs vs `--no-overlap`: " + "; ".join(pairs) + ".")
    if "smolvla" in results:
        fewest = min(r[2] for r in results["smolvla"])
        notes.append(f"SmolVLA rows are thin on a CPU (one inference takes seconds): a row completes between {fewest} and "
                     f"{max(r[2] for r in results['smolvla'])} requests (the `requests` column), so its p50/p99 are those of a "
                     "handful of samples (p99 is the slowest of them); on a GPU raise `--smolvla-seconds` and `--smolvla-max-requests`.")
    if not args.device.startswith("cuda"):
        notes.append(f"On {os.cpu_count()} CPU cores the forward pass itself is the bottleneck, so batching can win only what larger matrix "
                     "multiplies save; these rows show how each server queues concurrent clients "
                     "on this machine, not GPU throughput. Run `python benchmarks/throughput.py --device cuda` on a GPU.")
    notes += [target_line(policy.upper() if policy == "act" else "SmolVLA", rows, args.device) for policy, rows in results.items()]
    notes.append(f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; whole run "
                 f"{(time.monotonic() - run_started) / 60:.1f} min including checkpoint builds and server starts.")
    for (policy, name, clients), errors in failed.items():
        if errors:
            kinds = sorted({f"{type(e).__name__}: {e}" for e in errors})
            notes.insert(0, f"{policy}, {name}, {clients} clients: {len(errors)} clients failed mid-row ({'; '.join(kinds)}); "
                            "the requests they had completed count, the row's rate is what the server delivered.")
    parts += ["", *[f"- {note}" for note in notes]]
    table = "\n".join(parts)
    publish(f"Throughput, many clients ({args.device})", table, write=not args.no_write)


if __name__ == "__main__":
    main()
