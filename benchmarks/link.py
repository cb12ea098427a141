"""Round trips over emulated links (1 Gbit/s, 100 Mbit/s), raw frames against JPEG, and what JPEG does to actions.

The benchmark creates a network namespace of its own, brings up that
namespace's loopback and shapes it with ``tc``'s token bucket (``tbf``; this
kernel has no ``netem``, so no delay is added: a real link's propagation
delay would add the same to every row). Servers and clients run inside the
namespace on its 127.0.0.1; nothing else is reachable from it. On loopback
both directions share one queue, so the rate bounds request + reply together
(the reply is 2.8 KiB). The namespace is deleted at the end, also on errors.

Pairs, each against its own server process (a constant policy, so the rows
measure transport, not inference): openpi-client against openpi's reference
server design (raw arrays, as openpi sends them), policylink's client raw,
and policylink's client with ``image_codec="jpeg"`` at quality 90 and 75.
Payloads: the seeds' observation (3 cameras 480x640 + 14-d state) and 3
cameras 224x224 + 14-d state, camera-like frames from ``_frames.py``.

Action deviation: a served ACT checkpoint (LeRobot's default size, random
weights, 3 cameras 480x640, 14-d state and action, the tests' made-up
statistics) answers the same observations sent raw and as JPEG; reported is
max |action(JPEG) - action(raw)| divided by the joint's action std.

Needs root (``ip netns``, ``tc``).

    sudo .venv/bin/python benchmarks/link.py [--requests 40] [--seconds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _frames import tabletop_frame
from _report import percentile_ms, publish

HERE = Path(__file__).resolve().parent
#: name -> tbf rate; burst above loopback's 64 KiB MTU, queue deep enough for a whole request.
LINKS = {"1 Gbit/s": "1gbit", "100 Mbit/s": "100mbit"}
PAYLOADS = {"3 x 480x640 + 14-d state (the seeds')": (480, 640), "3 x 224x224 + 14-d state": (224, 224)}
QUALITIES = (90, 75)
CAMERAS = ("top", "left_wrist", "right_wrist")
#: The issue's targets at the seeds' payload: JPEG round trip <= this fraction of openpi's raw one.
TARGET_FRACTION = {"100 Mbit/s": 0.25, "1 Gbit/s": 0.5}
TARGET_DEVIATION = 0.01


def observation(size: tuple[int, int], seed: int = 0) -> dict:
    obs = {f"observation.images.{cam}": tabletop_frame(*size, seed=seed * 3 + i) for i, cam in enumerate(CAMERAS)}
    obs["observation.state"] = np.random.default_rng(seed).standard_normal(14).astype(np.float32)
    return obs


# -- inside the namespace ------------------------------------------------------


def measure_inside(requests: int, seconds: float) -> dict:
    """Every pair and payload on the current (shaped) loopback; bounded by count and time per row."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from _process import baseline_server, policylink_server
    from policylink import PolicyClient

    serve = ("--policy.type", "constant", "--policy.value", "0.5", "--policy.action_dim", "14", "--policy.horizon", "50")
    results: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(policylink_server(*serve))
        reference = stack.enter_context(baseline_server("openpi-style"))
        clients: dict[str, Callable[[dict], object]] = {}
        openpi = WebsocketClientPolicy(host="127.0.0.1", port=reference)
        stack.callback(openpi._ws.close)
        clients["openpi-client -> openpi reference server, raw"] = openpi.infer
        raw = stack.enter_context(PolicyClient(f"ws://127.0.0.1:{ours}", timeout=120))
        clients["policylink, raw"] = raw.infer
        for quality in QUALITIES:
            jpeg = stack.enter_context(PolicyClient(f"ws://127.0.0.1:{ours}", timeout=120, image_codec="jpeg", quality=quality))
            clients[f"policylink, JPEG q{quality}"] = jpeg.infer
        for payload, size in PAYLOADS.items():
            obs = observation(size)
            rows = results[payload] = {name: [] for name in clients}
            # Round robin in short rounds so that drift hits every pair alike; each row stops at its count or time.
            rounds, spent = 5, {name: 0.0 for name in clients}
            for _ in range(rounds):
                for name, infer in clients.items():
                    infer(obs)  # one untimed request per round
                    for _ in range(max(1, requests // rounds)):
                        if spent[name] > seconds:
                            break
                        started = time.perf_counter()
                        infer(obs)
                        rows[name].append(time.perf_counter() - started)
                        spent[name] += rows[name][-1]
    return results


# -- outside: namespace, shaping, deviation, report ---------------------------


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespace() -> object:
    name = f"policylink-link-{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def shape(ns: str, rate: str) -> str:
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "500ms")
    return subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout.strip()


def run_inside(ns: str, requests: int, seconds: float) -> dict:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, str(HERE / "link.py"), "--inside", "--requests", str(requests), "--seconds", str(seconds)],
        capture_output=True, text=True, cwd=HERE, timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the measurement inside the namespace failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


#: Qualities whose action deviation is measured (the round-trip rows use QUALITIES).
DEVIATION_QUALITIES = (75, 90, 95, 100)


def action_deviation(samples: int) -> dict[str, float]:
    """max |action - raw action| / action std (per joint, the checkpoint's statistics) for a served ACT over ``samples``
    observations: per JPEG quality, and for one grey level of noise on every pixel (a reference: less than any camera's
    own noise); ``spread``: the raw actions' own std per joint over steps and observations, in the same unit (mean over joints)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from lerobot.policies.act.configuration_act import ACTConfig

    from _process import policylink_server
    from lerobot_checkpoints import dataset_stats, features, save_checkpoint
    from policylink import PolicyClient

    cameras = {cam: (480, 640) for cam in CAMERAS}
    rng = np.random.default_rng(0)
    worst = {f"JPEG q{q}": 0.0 for q in DEVIATION_QUALITIES}
    worst["+-1 grey level of noise, raw"] = 0.0
    exact_actions = []
    with tempfile.TemporaryDirectory(prefix="policylink-link-") as tmp:
        inputs, outputs = features(14, 14, cameras)
        config = ACTConfig(input_features=inputs, output_features=outputs, device="cpu", pretrained_backbone_weights=None)
        stats = dataset_stats(14, 14, {cam: None for cam in cameras})
        std = stats["action"]["std"].numpy()  # per joint
        checkpoint = save_checkpoint(config, Path(tmp) / "act", stats)
        with policylink_server("--policy.path", str(checkpoint), "--device", "cpu") as port:
            url = f"ws://127.0.0.1:{port}"
            with PolicyClient(url, timeout=300) as raw, contextlib.ExitStack() as stack:
                jpeg = {q: stack.enter_context(PolicyClient(url, timeout=300, image_codec="jpeg", quality=q)) for q in DEVIATION_QUALITIES}
                for seed in range(samples):
                    obs = observation((480, 640), seed=seed)
                    exact = np.asarray(raw.infer(obs))
                    exact_actions.append(exact)
                    for quality, client in jpeg.items():
                        worst[f"JPEG q{quality}"] = max(worst[f"JPEG q{quality}"], float((np.abs(np.asarray(client.infer(obs)) - exact) / std).max()))
                    noisy = {key: np.clip(value.astype(np.int16) + rng.integers(-1, 2, value.shape), 0, 255).astype(np.uint8)
                             if key.startswith("observation.images") else value for key, value in obs.items()}
                    key = "+-1 grey level of noise, raw"
                    worst[key] = max(worst[key], float((np.abs(np.asarray(raw.infer(noisy)) - exact) / std).max()))
    # How widely this untrained network's own actions vary, per joint (over steps and observations), in the same unit.
    worst["spread"] = float((np.stack(exact_actions).reshape(-1, 14).std(axis=0) / std).mean())
    return worst


def report(results: dict[str, dict], qdiscs: dict[str, str], deviation: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        "Emulated links: a network namespace of the benchmark's own, its loopback shaped with `tc ... tbf rate R burst 256kb "
        "latency 500ms` (no `netem` in this kernel: no added delay). Request and reply share the shaped queue. Servers answer "
        "with a constant policy (the rows are transport); each pair has its own server process. Round robin in 5 rounds, "
        f"at most {args.requests} timed requests per row and about {args.seconds:g} s, one untimed request per round.",
        "",
        "| link | payload | pair | requests | p50 ms | p99 ms | p50 / openpi raw |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for link, by_payload in results.items():
        for payload, rows in by_payload.items():
            base = percentile_ms(rows["openpi-client -> openpi reference server, raw"], 50)
            for pair, samples in rows.items():
                p50 = percentile_ms(samples, 50)
                lines.append(f"| {link} | {payload} | {pair} | {len(samples)} | {p50:.1f} | {percentile_ms(samples, 99):.1f} | {p50 / base:.2f} |")
            if payload.endswith("(the seeds')"):
                fraction = {q: percentile_ms(rows[f"policylink, JPEG q{q}"], 50) / base for q in QUALITIES}
                ok = [q for q in QUALITIES if fraction[q] <= TARGET_FRACTION[link] and deviation[f"JPEG q{q}"] <= TARGET_DEVIATION]
                shown = max(QUALITIES)
                verdicts.append(
                    f"{link}, the seeds' payload: target JPEG round trip <= {TARGET_FRACTION[link]:g} x openpi's raw one with action "
                    f"deviation <= {TARGET_DEVIATION:.0%} of the action std: " + (f"met at q{max(ok)}" if ok else "NOT met") +
                    f" (q{shown}: {fraction[shown]:.2f} x the round trip, deviation {deviation[f'JPEG q{shown}']:.2%} of the std)."
                )
    spread = deviation["spread"]
    lines += ["", f"Action deviation (served ACT, LeRobot's default size, random weights, 3 cameras 480x640, 14-d actions, "
              f"{args.deviation_samples} observations): max over steps and joints of |action - action from raw frames| / that "
              f"joint's action std (the checkpoint's statistics). This untrained network's own actions vary by {spread:.2f} std "
              "per joint.", "",
              "| frames sent as | max deviation / action std |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.2%} |" for name, value in deviation.items() if name != "spread"]
    lines += [""] + [f"- {verdict}" for verdict in verdicts]
    lines += [f"- `tc qdisc show` for {link}: `{qdisc}`" for link, qdisc in qdiscs.items()]
    lines.append(f"- An untrained ACT's actions hardly depend on its inputs (they vary by {deviation['spread']:.2f} std across steps "
                 "and observations), so these rows say how far compression moves a default-size network, not how a trained policy "
                 "reacts; the one-grey-level row puts them in scale (any camera's own sensor noise is larger). Check your policy by "
                 "comparing `--image-codec jpeg` with raw on recorded frames.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per row at most (default: 40)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per row at most, roughly (default: 20)")
    parser.add_argument("--deviation-samples", type=int, default=5, help="observations for the action deviation (default: 5)")
    parser.add_argument("--links", nargs="*", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(measure_inside(args.requests, args.seconds)))
        return
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        raise SystemExit("link.py needs root and iproute2 (ip, tc) to create and shape its own network namespace")
    results, qdiscs = {}, {}
    with namespace() as ns:
        for link in args.links:
            qdiscs[link] = shape(ns, LINKS[link])
            print(f"{link}: {qdiscs[link]}", flush=True)
            results[link] = run_inside(ns, args.requests, args.seconds)
            for payload, rows in results[link].items():
                for pair, samples in rows.items():
                    print(f"  {payload:40s} {pair:50s} p50 {percentile_ms(samples, 50):8.1f} ms", flush=True)
    deviation = action_deviation(args.deviation_samples)
    print(deviation, flush=True)
    table = report(results, qdiscs, deviation, args)
    publish("Links: raw against JPEG", table, write=not args.no_write)


if __name__ == "__main__":
    main()
