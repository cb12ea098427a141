"""Speed options of the LeRobot backend: bfloat16 and ``--compile``, against float32 eager, per policy type.

Each option is kept as the default only where it is faster *and* gives the
same actions within tolerance; this benchmark measures both. A policy is
built at LeRobot's default size (random weights, made-up statistics; the
cases of ``inference.py``), loaded with ``policylink.backends.lerobot.load_policy``
once per option, and timed on the server's own request path without the
network: ``infer_batch`` (map, tensors on the device, pre-processor, one
forward pass, post-processor, copy to the host) for a batch of 1 and of 8
identical clients' observations. Every request carries a ``__seed__``, so
the sampling noise is the same in every option and the actions can be
compared with float32 eager's row by row (max |difference|, in action units:
the statistics are mean 0, std 1).

    .venv/bin/python benchmarks/speed_options.py                    # CPU: ACT and Diffusion (10-step DDIM)
    .venv/bin/python benchmarks/speed_options.py --device cuda --policies act diffusion smolvla
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# A cold compiler cache, so that `load s` shows what compiling costs a fresh machine (a restart with a warm cache is faster).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="policylink-inductor-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _report import publish  # noqa: E402
from inference import CASES, build_checkpoint, observation  # noqa: E402
from policylink.backends.lerobot import load_policy  # noqa: E402
from policylink.rtc.request import SEED_KEY  # noqa: E402

#: Largest max |action difference| from float32 eager for an option to count as giving the same actions.
TOLERANCE = 1e-3
#: (name, load_policy options); CUDA adds CUDA graphs and bfloat16 + compile.
OPTIONS = [("float32, eager", {}), ("bfloat16 autocast", {"dtype": "bfloat16"}), ("torch.compile", {"compile": "default"})]
CUDA_OPTIONS = [("torch.compile reduce-overhead (CUDA graphs)", {"compile": "reduce-overhead"}),
                ("bfloat16 + torch.compile", {"dtype": "bfloat16", "compile": "default"})]


def seeded(case: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    obs = observation(case)
    if case.get("task"):
        obs["task"] = case["task"]
    return [dict(obs, **{SEED_KEY: 100 + row}) for row in range(rows)]


def time_option(directory: Path, case: dict[str, Any], device: str, options: dict[str, Any], batches: list[int], reps: int) -> dict[str, Any]:
    """Load with ``options``; per batch size the median ms of ``reps`` timed calls and the first call's actions."""
    started = time.perf_counter()
    policy = load_policy(directory, device=device, **options)
    load_s = time.perf_counter() - started
    case_obs = {rows: seeded(case, rows) for rows in batches}
    result: dict[str, Any] = {"load_s": load_s, "ms": {}, "actions": {}}
    try:
        for rows in batches:
            # Fresh sessions for the compared call: Diffusion's history then holds this observation only.
            replies = policy.infer_batch([policy.session() for _ in range(rows)], case_obs[rows])
            result["actions"][rows] = np.stack([reply["actions"] for reply in replies])
            sessions = [policy.session() for _ in range(rows)]
            durations = []
            for _ in range(reps):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                began = time.perf_counter()
                policy.infer_batch(sessions, case_obs[rows])
                durations.append(time.perf_counter() - began)
            result["ms"][rows] = statistics.median(durations) * 1e3
            print(f"  batch {rows:2d}: {result['ms'][rows]:9.1f} ms", flush=True)
    finally:
        policy.close()
        del policy
        gc.collect()
    return result


def verdict(name: str, row: dict[str, Any], base: dict[str, Any], batches: list[int]) -> str:
    if row is base:
        return "default (the baseline)"
    faster = all(row["ms"][rows] < base["ms"][rows] for rows in batches)
    same = row["diff"] <= TOLERANCE
    if faster and same:
        if "compile" in name:
            return "faster, same actions; opt-in all the same: the compile at every load (`load s`) would hold up start-up and configure requests"
        return "faster, same actions: candidate default"
    reasons = ([] if faster else ["slower"]) + ([] if same else [f"actions differ by {row['diff']:.1e} > {TOLERANCE:g}"])
    return "not the default: " + " and ".join(reasons)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policies", nargs="*", default=None, choices=list(CASES),
                        help="policy types (default: act diffusion-ddim10 on a CPU, act diffusion smolvla on CUDA)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per batch size, after one untimed (default: 5)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    policies = args.policies or (["act", "diffusion", "smolvla"] if cuda else ["act", "diffusion-ddim10"])
    options = OPTIONS + (CUDA_OPTIONS if cuda else [])
    run_started = time.monotonic()
    tables = []
    with tempfile.TemporaryDirectory(prefix="policylink-speed-") as tmp:
        for name in policies:
            case = CASES[name]
            directory = build_checkpoint(case, Path(tmp) / name)
            rows: list[tuple[str, dict[str, Any]]] = []
            for option, kwargs in options:
                print(f"{name}: {option}", flush=True)
                rows.append((option, time_option(directory, case, args.device, kwargs, args.batches, args.reps)))
            base = rows[0][1]
            for _, row in rows:
                row["diff"] = max(float(np.abs(row["actions"][b] - base["actions"][b]).max()) for b in args.batches)
            head = " | ".join(f"batch {b} ms" for b in args.batches)
            lines = [f"**{name}**: {case['what']}.", "",
                     f"| option | load s | {head} | max abs diff | verdict |",
                     "| --- | ---: | " + " | ".join("---:" for _ in args.batches) + " | ---: | --- |"]
            for option, row in rows:
                times = " | ".join(f"{row['ms'][b]:.1f}" for b in args.batches)
                lines.append(f"| {option} | {row['load_s']:.1f} | {times} | {row['diff']:.1e} | {verdict(option, row, base, args.batches)} |")
            tables.append("\n".join(lines))
    parts = [
        f"Device `{args.device}`; torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({os.cpu_count()} CPUs). "
        f"Time: median of {args.reps} calls of the backend's `infer_batch` (the server's request path without the network), "
        f"after one untimed call; `load s` includes the warm-up, which for `torch.compile` compiles the network for a batch of "
        f"one and for larger batches (dynamic batch size), from a cold compiler cache. `max abs diff`: largest difference from float32 eager's actions for "
        f"the same observations and seeds, over the batch sizes; the same within {TOLERANCE:g}.",
        "", *("\n\n".join(tables).split("\n")), "",
        f"- Whole run {(time.monotonic() - run_started) / 60:.1f} min.",
    ]
    if not cuda:
        parts.append("- GPU rows (CUDA graphs, bfloat16 on a GPU): not measured: no GPU lent. "
                     "Run `python benchmarks/speed_options.py --device cuda` on one.")
    table = "\n".join(parts)
    publish(f"Speed options ({args.device})", table, write=not args.no_write)


if __name__ == "__main__":
    main()
