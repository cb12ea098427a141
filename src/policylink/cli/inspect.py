"""``policylink inspect DIR``: what a LeRobot checkpoint expects and returns, without loading its weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = """\
Print a LeRobot checkpoint's policy type, input and output features, chunk
length, normalisation, and the observation keys a client must send. Reads
config.json and the saved processor pipelines; the weights are not loaded.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show what a LeRobot checkpoint expects and returns",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", metavar="DIR", help="LeRobot checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def summarize(path: str | Path) -> dict[str, Any]:
    """The checkpoint's type, features, chunk length and the client's keys, as plain data."""
    from ..backends.lerobot import resolve_checkpoint
    from ..backends.obsmap import camera_name, is_camera_key

    directory = resolve_checkpoint(path)
    config = json.loads((directory / "config.json").read_text())
    inputs = {key: value for key, value in (config.get("input_features") or {}).items()}
    outputs = {key: value for key, value in (config.get("output_features") or {}).items()}
    client_keys: dict[str, str] = {}
    for key, feature in inputs.items():
        shape = list(feature.get("shape", []))
        if is_camera_key(key):
            client_keys[key] = f"HxWx3 uint8 (any size; resized to {shape[-2]}x{shape[-1]}) or {shape} float in [0, 1]"
        else:
            client_keys[key] = f"{shape} float32"
    kind = str(config.get("type", "unknown"))
    return {
        "path": str(directory),
        "type": kind,
        "input_features": {key: {"type": value.get("type"), "shape": value.get("shape")} for key, value in inputs.items()},
        "output_features": {key: {"type": value.get("type"), "shape": value.get("shape")} for key, value in outputs.items()},
        "cameras": [camera_name(key) for key in inputs if is_camera_key(key)],
        "chunk_length": _chunk_length(config),
        "n_action_steps": config.get("n_action_steps"),
        "n_obs_steps": config.get("n_obs_steps", 1),
        "normalization": config.get("normalization_mapping", {}),
        "processors_saved": all((directory / f"policy_{side}processor.json").is_file() for side in ("pre", "post")),
        "client_must_send": client_keys,
        "language": "task" if kind in _LANGUAGE_POLICIES else None,
    }


#: Policy types whose pre-processor tokenises a ``task`` prompt.
_LANGUAGE_POLICIES = ("smolvla", "pi0", "pi05", "pi0_fast", "xvla", "groot", "wall_x")


def _chunk_length(config: dict[str, Any]) -> int | None:
    """Actions returned per inference: Diffusion returns ``n_action_steps``, the others their chunk."""
    if config.get("type") == "diffusion":
        return config.get("n_action_steps")
    return config.get("chunk_size") or config.get("n_action_steps")


def run(args: argparse.Namespace) -> int:
    summary = summarize(args.path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"checkpoint: {summary['path']}")
    print(f"type:       {summary['type']}")
    print(f"chunk:      {summary['chunk_length']} actions per inference (policy executes {summary['n_action_steps']}; {summary['n_obs_steps']} observation step(s))")
    print("inputs:")
    for key, feature in summary["input_features"].items():
        print(f"  {key:<36} {feature['type']:<8} {feature['shape']}")
    print("outputs:")
    for key, feature in summary["output_features"].items():
        print(f"  {key:<36} {feature['type']:<8} {feature['shape']}")
    print(f"normalisation: {summary['normalization'] or 'none'} (processors saved: {'yes' if summary['processors_saved'] else 'no'})")
    print("a client must send:")
    for key, what in summary["client_must_send"].items():
        print(f"  {key:<36} {what}")
    if summary["language"]:
        print(f"  {'task':<36} str prompt (or set --policy.task / configure task)")
    return 0
