"""Export a recorded session as a LeRobot dataset, with LeRobot's own writer.

Each episode of the session becomes an episode of the dataset: the recorded
state is ``observation.state``, the executed action is ``action`` and each
camera is ``observation.images.<camera>`` (stored as images, or as video with
``video=True``). The dataset is written to a local folder only and loads back
with ``LeRobotDataset(repo_id, root=out_dir)``.

Steps without an executed action (the loop held still) are left out. A step
whose frame was dropped while recording reuses the camera's previous frame in
its episode (or the episode's first saved one), so every row has every
camera; the summary counts both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..media import decode_jpeg
from .session import LOG_FILE, METADATA_FILE

__all__ = ["export_lerobot", "read_session", "ExportSummary", "SessionError"]

logger = logging.getLogger("policylink.record")


class SessionError(ValueError):
    """A session folder is missing, incomplete or malformed."""


@dataclasses.dataclass
class ExportSummary:
    """What :func:`export_lerobot` wrote."""

    root: Path
    repo_id: str
    episodes: int = 0
    frames: int = 0
    skipped_steps: int = 0
    filled_frames: int = 0
    fps: int = 0
    cameras: tuple[str, ...] = ()


def read_session(session_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``metadata.json`` and the lines of ``inference_log.jsonl`` of a session folder."""
    session = Path(session_dir)
    if not (session / METADATA_FILE).is_file():
        raise SessionError(f"{session} is not a policylink session: no {METADATA_FILE}")
    if not (session / LOG_FILE).is_file():
        raise SessionError(f"{session} has no {LOG_FILE}: the session recorded no step")
    metadata = json.loads((session / METADATA_FILE).read_text(encoding="utf-8"))
    lines = []
    with open(session / LOG_FILE, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as exc:
                # The last line of a session killed mid-write may be cut: skip only that one.
                if handle.readline() == "":
                    logger.warning("%s line %d is truncated; skipped", LOG_FILE, number)
                    break
                raise SessionError(f"{session / LOG_FILE} line {number} is not JSON: {exc}") from None
    return metadata, lines


def export_lerobot(
    session_dir: str | Path,
    out_dir: str | Path,
    *,
    repo_id: str | None = None,
    fps: int | None = None,
    task: str | None = None,
    video: bool = False,
    robot_type: str | None = None,
) -> ExportSummary:
    """Write the session at ``session_dir`` as a LeRobot dataset rooted at ``out_dir``.

    ``out_dir`` must not exist yet. ``fps`` defaults to the rate recorded in
    the session's metadata, else the rate measured from its timestamps.
    Needs the ``[server]`` extra (LeRobot).
    """
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError as exc:
        raise ImportError(f"exporting to LeRobot needs the server extra: pip install 'policylink[server]' ({exc})") from None

    session = Path(session_dir)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output folder")
    metadata, lines = read_session(session)
    steps = [line for line in lines if line.get("action") is not None and line.get("state") is not None]
    if not steps:
        raise SessionError(f"{session} has no step with both a state and an executed action to export")
    cameras = _cameras(steps)
    rate = fps or _recorded_fps(metadata) or _measured_fps(steps)
    summary = ExportSummary(root=out, repo_id=repo_id or f"local/{session.name}", fps=rate, cameras=tuple(cameras))
    summary.skipped_steps = len(lines) - len(steps)
    default_task = task or _metadata_task(metadata) or "policylink session"

    features = _features(steps[0], cameras, session, video)
    dataset = LeRobotDataset.create(
        summary.repo_id, fps=rate, features=features, root=out, robot_type=robot_type or metadata.get("robot_type"), use_videos=video
    )
    for episode_steps in _episodes(steps):
        last_frames: dict[str, np.ndarray] = {}
        for line in episode_steps:
            frame: dict[str, Any] = {
                "observation.state": np.asarray(line["state"], np.float32),
                "action": np.asarray(line["action"], np.float32),
                "task": line.get("task") or default_task,
            }
            for camera in cameras:
                path = _image_path(session, line, camera)
                if path is not None:
                    last_frames[camera] = decode_jpeg(path.read_bytes())
                else:
                    summary.filled_frames += 1
                    if camera not in last_frames:  # dropped at the episode's start: use its first saved frame
                        last_frames[camera] = decode_jpeg(_first_image(session, episode_steps, camera).read_bytes())
                frame[f"observation.images.{camera}"] = last_frames[camera]
            dataset.add_frame(frame)
            summary.frames += 1
        dataset.save_episode()
        summary.episodes += 1
    dataset.finalize()
    return summary


def _episodes(steps: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """The steps of each episode number, episodes in order of first appearance.

    Grouping by number (not by consecutive runs) keeps episodes whole when
    several environments stepped in parallel and their lines interleave.
    """
    episodes: dict[Any, list[dict[str, Any]]] = {}
    for line in steps:
        episodes.setdefault(line.get("episode"), []).append(line)
    yield from episodes.values()


def _image_path(session: Path, line: dict[str, Any], camera: str) -> Path | None:
    relative = (line.get("images") or {}).get(camera)
    return session / relative if relative and (session / relative).is_file() else None


def _first_image(session: Path, episode_steps: list[dict[str, Any]], camera: str) -> Path:
    for line in episode_steps:
        if (path := _image_path(session, line, camera)) is not None:
            return path
    line = episode_steps[0]
    raise SessionError(f"episode {line.get('episode')} has no saved {camera} image at all (every frame was dropped)")


def _cameras(steps: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for line in steps:
        names.update(dict.fromkeys(line.get("images") or {}))
    return list(names)


def _features(first: dict[str, Any], cameras: list[str], session: Path, video: bool) -> dict[str, dict[str, Any]]:
    state_dim, action_dim = len(first["state"]), len(first["action"])
    features: dict[str, dict[str, Any]] = {
        "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": [f"state_{i}" for i in range(state_dim)]},
        "action": {"dtype": "float32", "shape": (action_dim,), "names": [f"action_{i}" for i in range(action_dim)]},
    }
    for camera in cameras:
        features[f"observation.images.{camera}"] = {
            "dtype": "video" if video else "image",
            "shape": _first_frame_shape(session, camera),
            "names": ["height", "width", "channels"],
        }
    return features


def _first_frame_shape(session: Path, camera: str) -> tuple[int, int, int]:
    for path in sorted((session / "images").glob(f"frame_*/{camera}.jpg")):
        height, width, channels = decode_jpeg(path.read_bytes()).shape
        return (height, width, channels)
    raise SessionError(f"{session} lists camera {camera!r} but holds none of its images")


def _recorded_fps(metadata: dict[str, Any]) -> int | None:
    """The control rate the session ran at: the client's, else the environment's, else the policy's."""
    for section in (metadata.get("client"), metadata, metadata.get("env"), metadata.get("policy")):
        value = section.get("fps") if isinstance(section, dict) else None
        if value:
            return max(1, round(float(value)))
    return None


def _measured_fps(steps: list[dict[str, Any]]) -> int:
    times = np.array([line["time"] for line in steps], dtype=np.float64)
    gaps = np.diff(times)
    gaps = gaps[gaps > 0]
    return max(1, round(1.0 / float(np.median(gaps)))) if len(gaps) else 30


def _metadata_task(metadata: dict[str, Any]) -> str | None:
    client = metadata.get("client")
    task = (client.get("task") if isinstance(client, dict) else None) or metadata.get("task")
    return str(task) if task else None
