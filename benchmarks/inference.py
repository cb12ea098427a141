"""Server-side inference latency of real LeRobot policies, per policy type, against LeRobot alone.

Each policy is built at LeRobot's default model size with random weights
(same compute as a trained one), saved with LeRobot's own code, loaded by
``policylink.backends.lerobot`` and served on 127.0.0.1; a PolicyClient sends
camera-sized observations. Reported: the server's ``infer_ms`` (mapping,
resize, pre-processing, one ``predict_action_chunk``, post-processing, copy
to host), the client's round trip, and the same checkpoint run by LeRobot
alone in this process (``from_pretrained`` + ``make_pre_post_processors``:
pre-process, ``predict_action_chunk``, post-process), so that the difference
is the server's own overhead.

SmolVLA is measured twice on one loaded server, requests interleaved: plain,
and with real-time-chunking (RTC) guidance (each request carries the
previous chunk's unexecuted half as ``__rtc__``). Its SmolVLM2-500M backbone
is built locally (architecture only: no hub access, random weights).

    .venv/bin/python benchmarks/inference.py                      # CPU, every policy
    .venv/bin/python benchmarks/inference.py --policies smolvla --requests 5
    .venv/bin/python benchmarks/inference.py --device cuda        # a GPU
    .venv/bin/python benchmarks/inference.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature, RTCAttentionSchedule
from lerobot.policies.act.configuration_act import ACTConfig
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.factory import get_policy_class, make_pre_post_processors
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.utils import populate_queues, prepare_observation_for_inference

from _report import percentile_ms, write_section
from policylink import PolicyClient
from policylink.backends.lerobot import load_policy
from policylink.rtc.request import RTC_KEY
from policylink.server.background import BackgroundServer

#: RTC request of the smolvla rows: the previous chunk's steps [REMAINDER_FROM:] guide the new one.
RTC_REMAINDER_FROM, RTC_DELAY, RTC_HORIZON = 25, 5, 25
#: SmolVLA's prompt (the tokenizer built below knows these words).
TASK = "pick up the cube"

#: SmolVLM2-500M-Video-Instruct's architecture (HF ``config.json``; sources in the section's notes).
SMOLVLM2_500M_TEXT = {
    "model_type": "llama", "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
    "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49280,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
SMOLVLM2_500M_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "image_size": 512, "patch_size": 16}
SMOLVLM2_500M_SCALE_FACTOR = 4


def build_smolvlm2_backbone(directory: Path) -> Path:
    """SmolVLM2-500M's config (full size) with a small word-level tokenizer, where SmolVLA's ``vlm_model_name`` points.

    SmolVLA reads its backbone's config and tokenizer from the hub even with
    random weights; this directory holds the same files, built offline (with
    the test suite's builder). The tokenizer knows only a few words, but the
    embedding table keeps the real vocabulary size (49280), so compute and
    memory match the real model.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from lerobot_checkpoints import build_smolvlm_backbone

    size = {"text": SMOLVLM2_500M_TEXT, "vision": SMOLVLM2_500M_VISION, "scale_factor": SMOLVLM2_500M_SCALE_FACTOR, "image_seq_len": 64}
    return build_smolvlm_backbone(directory, size)


def _smolvla(inputs: dict, outputs: dict, root: Path) -> SmolVLAConfig:
    """SmolVLAConfig defaults (16 VLM layers, expert width 0.75, chunk 50, 10 steps, 512x512), backbone built offline."""
    backbone = build_smolvlm2_backbone(root / "smolvlm2-500m")
    return SmolVLAConfig(input_features=inputs, output_features=outputs, vlm_model_name=str(backbone), load_vlm_weights=False)


#: name -> config factory (input features, output features, scratch dir), state/action dim,
#: cameras with LeRobot input size, client frame size; ``rtc``: also measure RTC-guided requests.
CASES: dict[str, dict[str, Any]] = {
    "act": {
        "what": "ACT, LeRobot defaults (ResNet-18, dim 512, chunk 100), SO-100 arm: 6-d, front + wrist cameras",
        "make": lambda inputs, outputs, root: ACTConfig(input_features=inputs, output_features=outputs, pretrained_backbone_weights=None),
        "dim": 6, "cameras": {"front": (480, 640), "wrist": (480, 640)}, "frame": (480, 640),
    },
    "diffusion": {
        "what": "Diffusion, LeRobot defaults (U-Net 512/1024/2048, 100 denoising steps), PushT-like: 2-d, one 96x96 camera",
        "make": lambda inputs, outputs, root: DiffusionConfig(input_features=inputs, output_features=outputs, crop_shape=None),
        "dim": 2, "cameras": {"top": (96, 96)}, "frame": (96, 96),
    },
    "diffusion-ddim10": {
        "what": "the same Diffusion policy with a 10-step DDIM sampler",
        "make": lambda inputs, outputs, root: DiffusionConfig(input_features=inputs, output_features=outputs, crop_shape=None,
                                                              noise_scheduler_type="DDIM", num_inference_steps=10),
        "dim": 2, "cameras": {"top": (96, 96)}, "frame": (96, 96),
    },
    "smolvla": {
        "what": "SmolVLA, LeRobot defaults (SmolVLM2-500M architecture, first 16 of its 32 text layers, expert width 0.75, "
                "chunk 50, 10 flow-matching steps, images padded to 512x512), SO-100 arm: 6-d, front + wrist cameras, a task prompt",
        "make": _smolvla,
        "dim": 6, "cameras": {"front": (480, 640), "wrist": (480, 640)}, "frame": (480, 640), "task": TASK, "rtc": True,
    },
}


def build_checkpoint(case: dict[str, Any], root: Path) -> Path:
    """Random weights at full size, with made-up statistics, saved the way training saves them."""
    dim = case["dim"]
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (dim,))}
    inputs.update({f"observation.images.{name}": PolicyFeature(FeatureType.VISUAL, (3, *size)) for name, size in case["cameras"].items()})
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (dim,))}
    root.mkdir(parents=True, exist_ok=True)
    config = case["make"](inputs, outputs, root)
    config.device = "cpu"

    def moments(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {"mean": torch.zeros(shape), "std": torch.ones(shape), "min": -torch.ones(shape), "max": torch.ones(shape)}

    stats = {"observation.state": moments((dim,)), "action": moments((dim,))}
    stats.update({key: moments((3, 1, 1)) for key in inputs if "images" in key})
    torch.manual_seed(0)
    policy = get_policy_class(config.type)(config)
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    directory = root / "checkpoint"
    for part in (policy, pre, post):
        part.save_pretrained(directory)
    del policy
    gc.collect()
    return directory


def observation(case: dict[str, Any], size_key: str = "frame") -> dict[str, Any]:
    """One robot observation: HxWx3 uint8 frames (the client's size, or the policy's with ``size_key=None``), state."""
    rng = np.random.default_rng(0)
    obs: dict[str, Any] = {}
    for name, size in case["cameras"].items():
        obs[f"observation.images.{name}"] = rng.integers(0, 256, (*(case[size_key] if size_key else size), 3), dtype=np.uint8)
    obs["observation.state"] = rng.standard_normal(case["dim"]).astype(np.float32)
    return obs


class InProcess:
    """LeRobot alone, no policylink: its loaders, ``prepare_observation_for_inference``, pre-processor,
    ``predict_action_chunk`` (with LeRobot's own RTC arguments for the guided mode), post-processor, copy to host.

    Frames are given at the policy's input size (LeRobot does not resize); plain calls run under
    ``inference_mode`` as LeRobot's ``predict_action`` does, guided ones under ``no_grad`` (RTC needs autograd).
    """

    def __init__(self, directory: Path, case: dict[str, Any], device: str, dtype: str | None) -> None:
        self.case, self.device = case, device
        self.config = config = PreTrainedConfig.from_pretrained(str(directory))
        config.device = device
        self.policy = get_policy_class(config.type).from_pretrained(str(directory), config=config)
        self.policy.to(device).eval()
        self.pre, self.post = make_pre_post_processors(
            config, pretrained_path=str(directory),
            preprocessor_overrides={"device_processor": {"device": device}}, postprocessor_overrides={"device_processor": {"device": "cpu"}},
        )
        self.obs = observation(case, size_key=None)
        self.rtc = RTCConfig(enabled=True, prefix_attention_schedule=RTCAttentionSchedule.LINEAR, max_guidance_weight=10.0,
                             execution_horizon=RTC_HORIZON) if case.get("rtc") else None
        if self.rtc is not None:
            self.policy.config.rtc_config = self.rtc
            self.policy.init_rtc_processor()
        self.dtype = dtype if dtype and dtype != "float32" else None
        self.remainder: torch.Tensor | None = None  # model-space steps [RTC_REMAINDER_FROM:] of the last chunk

    def step(self, mode: str) -> tuple[float, float]:
        """One inference; returns its wall-clock and process CPU durations in seconds."""
        policy, guided = self.policy, mode == "rtc"
        policy.config.rtc_config = self.rtc if guided else None  # plain calls take LeRobot's unguided path
        autocast = torch.autocast(device_type=self.device.split(":")[0], dtype=getattr(torch, self.dtype)) if self.dtype else contextlib.nullcontext()
        started, cpu = time.perf_counter(), time.process_time()
        with (torch.no_grad() if guided else torch.inference_mode()), autocast:
            batch = prepare_observation_for_inference(dict(self.obs), torch.device(self.device), self.case.get("task"))
            batch = self.pre(batch)
            batch.pop("action", None)
            if self.config.type in ("diffusion", "vqbet"):  # what select_action does: stack cameras, fill the history
                batch["observation.images"] = torch.stack([batch[key] for key in self.config.image_features], dim=-4)
                policy._queues = populate_queues(policy._queues, batch)
            kwargs = {"inference_delay": RTC_DELAY, "prev_chunk_left_over": self.remainder, "execution_horizon": RTC_HORIZON} if guided else {}
            raw = policy.predict_action_chunk(batch, **kwargs)
            self.post(raw).float().cpu().numpy()
        elapsed = time.perf_counter() - started, time.process_time() - cpu
        self.remainder = raw[:, RTC_REMAINDER_FROM:].clone()
        return elapsed


def measure(directory: Path, case: dict[str, Any], device: str, dtype: str | None, requests: int, in_process: bool) -> dict[str, Any]:
    """Served (one client, requests one after another) and, interleaved with it, LeRobot alone.

    Plain and RTC-guided requests are interleaved too, so that load from elsewhere on the machine hits all alike.
    """
    started = time.perf_counter()
    policy = load_policy(directory, device=device, dtype=dtype)  # includes one warm-up inference
    load_s = time.perf_counter() - started
    meta = policy.metadata
    modes = ["plain", "rtc"] if case.get("rtc") else ["plain"]
    if "rtc" in modes and meta.rtc is None:
        raise SystemExit(f"the server announces no RTC support for {meta.policy_type}: RTC fields would be ignored")
    local = InProcess(directory, case, device, dtype) if in_process else None
    obs = observation(case)
    if case.get("task"):
        obs["task"] = case["task"]
    samples: dict[str, dict[str, list[float]]] = {mode: {"infer": [], "roundtrip": [], "cpu": [], "local": [], "local_cpu": [], "follow": []} for mode in modes}

    def guided(previous: np.ndarray) -> dict[str, Any]:
        prefix = np.ascontiguousarray(previous[RTC_REMAINDER_FROM:], dtype=np.float32)
        return {**obs, RTC_KEY: {"prefix": prefix, "delay": RTC_DELAY, "execution_horizon": RTC_HORIZON}}

    with BackgroundServer(policy, host="127.0.0.1") as server, PolicyClient(server.url, timeout=600) as client:
        previous = None
        if local is not None:  # warm-up, as load_policy's
            local.step("plain")
        if "rtc" in modes:  # warm the guided path (autograd, guidance weights) and get a first chunk to continue
            previous = np.asarray(client.infer(guided(np.zeros((meta.horizon, meta.action_dim), np.float32))))
            if local is not None:
                local.step("rtc")
        for _ in range(requests):
            for mode in modes:
                request, cpu = guided(previous) if mode == "rtc" else obs, time.process_time()
                chunk = client.infer(request)
                samples[mode]["cpu"].append(time.process_time() - cpu)  # server and client share this process
                samples[mode]["infer"].append(chunk.server_timing["infer_ms"] / 1e3)
                samples[mode]["roundtrip"].append(chunk["client_timing"]["roundtrip_ms"] / 1e3)
                if previous is not None and "rtc" in modes:  # how closely the first `delay` steps follow the remainder they were given
                    target = previous[RTC_REMAINDER_FROM:RTC_REMAINDER_FROM + RTC_DELAY]
                    samples[mode]["follow"].append(float(np.abs(np.asarray(chunk)[:RTC_DELAY] - target).mean()))
                previous = np.asarray(chunk)
                if local is not None:
                    wall, cpu = local.step(mode)
                    samples[mode]["local"].append(wall)
                    samples[mode]["local_cpu"].append(cpu)
    policy.close()
    del policy, local
    gc.collect()
    return {"chunk": (meta.horizon, meta.action_dim), "load_s": load_s, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="mixed precision (default: float32)")
    parser.add_argument("--policies", nargs="*", default=list(CASES), choices=list(CASES), help="which policy types (default: all)")
    parser.add_argument("--requests", type=int, default=3, help="timed requests per policy (and mode), after warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the LeRobot-alone column")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, notes = [], []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="policylink-bench-") as tmp:
        for name in args.policies:
            case = CASES[name]
            started = time.perf_counter()
            directory = build_checkpoint(case, Path(tmp) / name)
            build_s = time.perf_counter() - started
            result = measure(directory, case, args.device, args.dtype, args.requests, in_process=not args.no_in_process)
            p50s: dict[str, dict[str, float]] = {}
            for mode, samples in result["samples"].items():
                label = name if mode == "plain" else f"{name} + RTC"
                p50s[mode] = m = {key: percentile_ms(values, 50) for key, values in samples.items() if key != "follow" and values}
                p90 = percentile_ms(samples["infer"], 90)
                local = "local" in m
                inproc = f"{m['local']:.1f}" if local else "-"
                overhead = f"{m['roundtrip'] - m['local']:+.1f}" if local else "-"
                cpu = f"{m['cpu']:.0f} / {m['local_cpu']:.0f}" if local else f"{m['cpu']:.0f} / -"
                print(f"{label:<18} chunk {result['chunk']}  infer p50 {m['infer']:9.1f} ms  p90 {p90:9.1f} ms  "
                      f"round trip p50 {m['roundtrip']:9.1f} ms  in-process p50 {inproc:>9} ms  CPU served / in-process {cpu} ms", flush=True)
                what = case["what"] if mode == "plain" else (
                    f"the same SmolVLA; each request also carries `{RTC_KEY}`: the previous reply's steps "
                    f"{RTC_REMAINDER_FROM}-{result['chunk'][0] - 1}, delay {RTC_DELAY}, execution horizon {RTC_HORIZON}")
                rows.append(f"| {label} | {what} | {result['chunk'][0]}x{result['chunk'][1]} | {m['infer']:.1f} | {p90:.1f} | {m['roundtrip']:.1f} "
                            f"| {inproc} | {overhead} | {cpu} | {result['load_s']:.1f} |")
            if case.get("rtc"):
                samples = result["samples"]

                def overhead_text(key: str) -> str:
                    diff = p50s["rtc"][key] - p50s["plain"][key]
                    paired = 1e3 * float(np.median(np.subtract(samples["rtc"][key], samples["plain"][key])))
                    return f"{diff:+.1f} ms ({100 * diff / p50s['plain'][key]:+.1f} %; median of back-to-back pairs {paired:+.1f} ms)"

                line = (f"RTC overhead ({name}, difference of p50s): served `infer` {overhead_text('infer')}, "
                        f"served process CPU {overhead_text('cpu')}")
                if samples["rtc"]["local"]:
                    line += f"; LeRobot alone {overhead_text('local')}, its CPU {overhead_text('local_cpu')}"
                follow = {mode: np.mean(values["follow"]) for mode, values in samples.items()}
                line += (f". Steering check: mean |action - remainder| over the first {RTC_DELAY} steps "
                         f"{follow['rtc']:.3f} guided vs {follow['plain']:.3f} unguided (random weights, actions in [-1, 1]).")
                notes.append(line)
                print(line, flush=True)
            if name == "smolvla":
                size_gb = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e9
                rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
                line = (f"SmolVLA build (random init + save) {build_s:.0f} s, checkpoint {size_gb:.2f} GB (float32), "
                        f"peak RSS of the benchmark process so far {rss_gb:.1f} GB (served and in-process copies loaded together).")
                notes.append(line)
                print(line, flush=True)

    precision = args.dtype or "float32"
    notes.append(f"1-minute load average of the machine {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                 f"({os.cpu_count()} CPUs): other work on the machine shows up as noise, alike in every column.")
    smolvla_notes = [
        "SmolVLA's backbone is built locally (no hub): SmolVLM2-500M-Video-Instruct's architecture, text llama 960 hidden / "
        "2560 intermediate / 32 layers / 15 heads / 5 KV heads / head dim 64 / vocabulary 49280 / 8192 positions / rope theta 1e5, "
        "vision SigLIP 768 / 3072 / 12 layers / 12 heads / 512 px / patch 16, pixel-shuffle scale factor 4 (64 tokens per image). "
        "Numbers checked against public copies of that `config.json` (HF `vidore/ColSmolVLM-Instruct-500M-base` for the "
        "SmolVLM-500M text/vision sizes, a printed SmolVLM2-500M `text_config` in a fork of LeRobot's `smolvlm_with_expert.py`, "
        "and a SmolVLM2-500M config fixture in a Swift port's tests), not against the hub file itself (no hub access). "
        "The tokenizer is a small word-level one; the embedding table keeps the real 49280 rows. SmolVLA keeps its "
        "defaults (`num_vlm_layers` 16, `expert_width_multiplier` 0.75, chunk 50, 10 steps, `resize_imgs_with_padding` 512x512, "
        "`load_vlm_weights` False).",
        "RTC on LeRobot 0.4.4: `RTCProcessor.denoise_step` evaluates the denoiser (`v_t`) *before* `x_t.requires_grad_()`, so "
        "its `autograd.grad` differentiates only `x_t - time * v_t` with respect to `x_t` (identity Jacobian): there is no "
        "backward pass through the network. What guidance costs is that call, running each of the 10 denoiser steps under "
        "`enable_grad` (the action expert's weights require grad, so autograd records its graph) and the server's `no_grad` "
        "instead of `inference_mode` for a steerable policy; the RTC overhead above measures exactly that.",
    ] if "smolvla" in args.policies else []
    body = "\n".join([
        f"Device `{args.device}`, {precision}, torch {torch.get_num_threads()} CPU threads; {args.requests} timed requests per policy "
        "(and mode) after warm-up, one client; random weights at LeRobot's default sizes (same compute as trained ones). `infer` is "
        "the server's `infer_ms`: observation mapping, image resize, pre-processor, one `predict_action_chunk`, post-processor, copy "
        "to host. `in-process` is the same checkpoint run by LeRobot alone (its `from_pretrained` and `make_pre_post_processors`; "
        "`prepare_observation_for_inference`, pre-processor, `predict_action_chunk`, post-processor, copy to host; frames already at "
        "the policy's input size), in the same process, each call right after the served request of the same mode; "
        "`served - in-process` is round trip p50 minus in-process p50: the server's own overhead (encoding, transport, "
        "mapping, resize), within timing noise. `CPU` is this process's CPU time per request (server and client share it; "
        "torch's worker threads count while they spin), steadier than wall-clock time when other work shares the machine.",
        "",
        "| policy | model | chunk | infer p50 ms | infer p90 ms | round trip p50 ms | in-process p50 ms | served - in-process ms "
        "| CPU p50 ms served / in-process | load + warm-up s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        *[f"- {note}" for note in notes + smolvla_notes],
    ])
    print(body)
    if not args.no_write:
        title = "Server-side inference latency" + ("" if args.device == "cpu" and precision == "float32" else f" ({args.device}, {precision})")
        write_section(title, body)


if __name__ == "__main__":
    main()
