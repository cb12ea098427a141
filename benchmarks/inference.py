"""Server-side inference latency of real LeRobot policies, per policy type.

Each policy is built at LeRobot's default model size with random weights
(same compute as a trained one), saved with LeRobot's own code, loaded by
``policylink.backends.lerobot`` and served on 127.0.0.1; a PolicyClient sends
camera-sized observations. Reported: the server's ``infer_ms`` (mapping,
resize, pre-processing, one ``predict_action_chunk``, post-processing, copy
to host) and the client's round trip.

    .venv/bin/python benchmarks/inference.py                      # CPU
    .venv/bin/python benchmarks/inference.py --device cuda        # a GPU
    .venv/bin/python benchmarks/inference.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.act.configuration_act import ACTConfig
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.factory import get_policy_class, make_pre_post_processors

from _report import percentile_ms, write_section
from policylink import PolicyClient
from policylink.backends.lerobot import load_policy
from policylink.server.background import BackgroundServer

#: name -> (config factory, state/action dim, cameras with LeRobot input size, client frame size)
CASES: dict[str, dict[str, Any]] = {
    "act": {
        "what": "ACT, LeRobot defaults (ResNet-18, dim 512, chunk 100), SO-100 arm: 6-d, front + wrist cameras",
        "make": lambda inputs, outputs: ACTConfig(input_features=inputs, output_features=outputs, pretrained_backbone_weights=None),
        "dim": 6, "cameras": {"front": (480, 640), "wrist": (480, 640)}, "frame": (480, 640),
    },
    "diffusion": {
        "what": "Diffusion, LeRobot defaults (U-Net 512/1024/2048, 100 denoising steps), PushT-like: 2-d, one 96x96 camera",
        "make": lambda inputs, outputs: DiffusionConfig(input_features=inputs, output_features=outputs, crop_shape=None),
        "dim": 2, "cameras": {"top": (96, 96)}, "frame": (96, 96),
    },
    "diffusion-ddim10": {
        "what": "the same Diffusion policy with a 10-step DDIM sampler",
        "make": lambda inputs, outputs: DiffusionConfig(input_features=inputs, output_features=outputs, crop_shape=None,
                                                        noise_scheduler_type="DDIM", num_inference_steps=10),
        "dim": 2, "cameras": {"top": (96, 96)}, "frame": (96, 96),
    },
}


def build_checkpoint(case: dict[str, Any], directory: Path) -> Path:
    """Random weights at full size, with made-up statistics, saved the way training saves them."""
    dim = case["dim"]
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (dim,))}
    inputs.update({f"observation.images.{name}": PolicyFeature(FeatureType.VISUAL, (3, *size)) for name, size in case["cameras"].items()})
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (dim,))}
    config = case["make"](inputs, outputs)
    config.device = "cpu"

    def moments(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {"mean": torch.zeros(shape), "std": torch.ones(shape), "min": -torch.ones(shape), "max": torch.ones(shape)}

    stats = {"observation.state": moments((dim,)), "action": moments((dim,))}
    stats.update({key: moments((3, 1, 1)) for key in inputs if "images" in key})
    torch.manual_seed(0)
    policy = get_policy_class(config.type)(config)
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    for part in (policy, pre, post):
        part.save_pretrained(directory)
    return directory


def measure(directory: Path, case: dict[str, Any], device: str, dtype: str | None, requests: int) -> dict[str, Any]:
    started = time.perf_counter()
    policy = load_policy(directory, device=device, dtype=dtype)  # includes one warm-up inference
    load_s = time.perf_counter() - started
    meta = policy.metadata
    rng = np.random.default_rng(0)
    obs = {f"observation.images.{name}": rng.integers(0, 256, (*case["frame"], 3), dtype=np.uint8) for name in case["cameras"]}
    obs["observation.state"] = rng.standard_normal(case["dim"]).astype(np.float32)
    infer_s, roundtrip_s = [], []
    with BackgroundServer(policy, host="127.0.0.1") as server, PolicyClient(server.url, timeout=600) as client:
        for _ in range(requests):
            chunk = client.infer(obs)
            infer_s.append(chunk.server_timing["infer_ms"] / 1e3)
            roundtrip_s.append(chunk["client_timing"]["roundtrip_ms"] / 1e3)
    return {"chunk": (meta.horizon, meta.action_dim), "load_s": load_s, "infer": infer_s, "roundtrip": roundtrip_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="mixed precision (default: float32)")
    parser.add_argument("--policies", nargs="*", default=list(CASES), choices=list(CASES), help="which policy types (default: all)")
    parser.add_argument("--requests", type=int, default=3, help="timed requests per policy, after warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="policylink-bench-") as tmp:
        for name in args.policies:
            case = CASES[name]
            directory = build_checkpoint(case, Path(tmp) / name)
            result = measure(directory, case, args.device, args.dtype, args.requests)
            p50, p90 = percentile_ms(result["infer"], 50), percentile_ms(result["infer"], 90)
            rt50 = percentile_ms(result["roundtrip"], 50)
            print(f"{name:<18} chunk {result['chunk']}  infer p50 {p50:9.1f} ms  p90 {p90:9.1f} ms  round trip p50 {rt50:9.1f} ms", flush=True)
            rows.append(f"| {name} | {case['what']} | {result['chunk'][0]}x{result['chunk'][1]} | {p50:.1f} | {p90:.1f} | {rt50:.1f} | {result['load_s']:.1f} |")

    precision = args.dtype or "float32"
    body = "\n".join([
        f"Device `{args.device}`, {precision}, torch {torch.get_num_threads()} CPU threads; {args.requests} timed requests per policy after warm-up; "
        "random weights at LeRobot's default sizes (same compute as trained ones). `infer` is the server's `infer_ms`: observation "
        "mapping, image resize, pre-processor, one `predict_action_chunk`, post-processor, copy to host.",
        "",
        "| policy | model | chunk | infer p50 ms | infer p90 ms | round trip p50 ms | load + warm-up s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    if not args.no_write:
        title = "Server-side inference latency" + ("" if args.device == "cpu" and precision == "float32" else f" ({args.device}, {precision})")
        write_section(title, body)


if __name__ == "__main__":
    main()
