"""Export a recorded session as a LeRobot dataset, with LeRobot's own writer.

Each episode of the session becomes an episode of the dataset, one frame per
recorded step in LeRobot's convention: frame ``t`` holds the observation at
step ``t`` (``observation.state`` and ``observation.images.<camera>``; frame 0
is the episode's reset observation) and ``action`` is the action executed at
step ``t``, the one chosen from that observation. Cameras are stored as
images, or as video with ``video=True``. The dataset is written to a local
folder only and loads back with ``LeRobotDataset(repo_id, root=out_dir)``.

Steps without an executed action (the loop held still) are left out. A step
whose frame was dropped while recording reuses the camera's previous frame in
its episode (or the episode's first saved one), so every row has every
camera; the summary counts both, and what the recording itself dropped.

Sessions of format 1 (recorded before policylink paired each action with the
observation it was chosen from) hold, on each line, an action and the
observation *after* it. They are realigned: action ``t`` is paired with the
previous line's observation, and the first step of each episode, whose
observation was never recorded, is left out.
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
from .session import FORMAT_VERSION, LOG_FILE, METADATA_FILE

__all__ = ["export_lerobot", "read_session", "video_decoder", "ExportSummary", "SessionError", "VideoUnavailable"]

logger = logging.getLogger("policylink.record")


#: Video encoders tried for ``video=True``, in order: LeRobot's default (AV1), then H.264.
VIDEO_CODECS = ("libsvtav1", "h264")


class SessionError(ValueError):
    """A session folder is missing, incomplete or malformed."""


class VideoUnavailable(RuntimeError):
    """``video=True``, but no video encoder LeRobot's writer can use works here."""


@dataclasses.dataclass
class ExportSummary:
    """What :func:`export_lerobot` wrote."""

    root: Path
    repo_id: str
    episodes: int = 0
    frames: int = 0
    #: Recorded steps that became no frame: no executed action (the loop held still),
    #: or, in a realigned format-1 session, the first step of each episode.
    skipped_steps: int = 0
    #: Camera images that were dropped while recording, filled with the camera's previous frame.
    filled_frames: int = 0
    #: Steps absent from the session's log (lines dropped while recording): gaps in the episodes.
    missing_steps: int = 0
    fps: int = 0
    cameras: tuple[str, ...] = ()
    #: The session's format version; below 2 it was realigned (see the module's documentation).
    format_version: int = FORMAT_VERSION
    realigned: bool = False
    #: What the recorder counted as dropped (``metadata.json`` ``stats``): frames, step lines, chunk lines.
    recorded_drops: dict[str, int] = dataclasses.field(default_factory=dict)
    #: With ``video=True``: the encoder used, and the backend LeRobot can decode the videos with here
    #: (``None`` when none loads; ``video_note`` says why).
    video_codec: str | None = None
    video_backend: str | None = None
    video_note: str = ""

    def load_hint(self) -> str:
        """The Python line that loads the dataset."""
        extra = f", video_backend={self.video_backend!r}" if self.video_codec and self.video_backend not in (None, "torchcodec") else ""
        return f"LeRobotDataset({self.repo_id!r}, root={str(self.root)!r}{extra})"


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
    version = _format_version(metadata)
    episodes = _aligned_episodes(lines, realign=version < 2)
    rows = [row for episode_rows in episodes for row in episode_rows]
    if not rows:
        raise SessionError(f"{session} has no step with both a state and an executed action to export")
    codec = _video_codec() if video else None  # refuse before anything is written
    cameras = _cameras([row.observation for row in rows])
    rate = fps or _recorded_fps(metadata) or _measured_fps([row.observation for row in rows])
    summary = ExportSummary(
        root=out, repo_id=repo_id or f"local/{session.name}", fps=rate, cameras=tuple(cameras), format_version=version, realigned=version < 2,
    )
    summary.skipped_steps = len(lines) - len(rows)
    summary.missing_steps = _missing_steps(lines, metadata) if version >= 2 else 0
    stats = metadata.get("stats") if isinstance(metadata.get("stats"), dict) else {}
    summary.recorded_drops = {key: int(stats.get(key) or 0) for key in ("frames_dropped", "step_lines_dropped", "chunk_lines_dropped")}
    if codec is not None:
        summary.video_codec = codec
        summary.video_backend, summary.video_note = video_decoder()
    default_task = task or _metadata_task(metadata) or "policylink session"

    features = _features(rows[0], cameras, session, video)
    create_options: dict[str, Any] = {"vcodec": codec} if codec is not None else {}
    if summary.video_backend is not None:
        create_options["video_backend"] = summary.video_backend
    dataset = LeRobotDataset.create(
        summary.repo_id, fps=rate, features=features, root=out, robot_type=robot_type or metadata.get("robot_type"), use_videos=video, **create_options
    )
    for episode_rows in episodes:
        if not episode_rows:
            continue
        observations = [row.observation for row in episode_rows]
        last_frames: dict[str, np.ndarray] = {}
        for row in episode_rows:
            frame: dict[str, Any] = {
                "observation.state": np.asarray(row.observation["state"], np.float32),
                "action": np.asarray(row.action, np.float32),
                "task": row.observation.get("task") or default_task,
            }
            for camera in cameras:
                path = _image_path(session, row.observation, camera)
                if path is not None:
                    last_frames[camera] = decode_jpeg(path.read_bytes())
                else:
                    summary.filled_frames += 1
                    if camera not in last_frames:  # dropped at the episode's start: use its first saved frame
                        last_frames[camera] = decode_jpeg(_first_image(session, observations, camera).read_bytes())
                frame[f"observation.images.{camera}"] = last_frames[camera]
            dataset.add_frame(frame)
            summary.frames += 1
        dataset.save_episode()
        summary.episodes += 1
    dataset.finalize()
    return summary


@dataclasses.dataclass
class _Row:
    """One frame of the dataset: the line holding the observation, and the action chosen from it."""

    observation: dict[str, Any]
    action: list[float]


def _format_version(metadata: dict[str, Any]) -> int:
    try:
        version = int(metadata.get("format_version", 1))
    except (TypeError, ValueError):
        raise SessionError(f"metadata.json has a bad format_version: {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise SessionError(f"the session is of format {version}, newer than this policylink reads ({FORMAT_VERSION}); upgrade policylink")
    return version


def _aligned_episodes(lines: list[dict[str, Any]], realign: bool) -> list[list[_Row]]:
    """Each episode's frames: (observation at step t, action executed at step t).

    A line of a current session holds both. A line of a format-1 session
    holds an action and the observation after it, so the observation an
    action was chosen from is on the line before.
    """
    episodes: list[list[_Row]] = []
    for episode_lines in _episodes(lines):
        rows: list[_Row] = []
        for index, line in enumerate(episode_lines):
            observation = (episode_lines[index - 1] if index > 0 else None) if realign else line
            if observation is not None and line.get("action") is not None and observation.get("state") is not None:
                rows.append(_Row(observation, line["action"]))
        episodes.append(rows)
    return episodes


def _missing_steps(lines: list[dict[str, Any]], metadata: dict[str, Any]) -> int:
    """Steps an episode had but the log lacks (lines dropped while recording)."""
    ended = {item.get("episode"): item.get("steps") for item in metadata.get("episodes") or [] if isinstance(item, dict)}
    missing = 0
    for episode_lines in _episodes(lines):
        steps = {line.get("step") for line in episode_lines if isinstance(line.get("step"), int)}
        if not steps:
            continue
        expected = max(max(steps) + 1, int(ended.get(episode_lines[0].get("episode")) or 0))
        missing += expected - len(steps)
    return missing


def _episodes(lines: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """The lines of each episode number, episodes in order of first appearance.

    Grouping by number (not by consecutive runs) keeps episodes whole when
    several environments stepped in parallel and their lines interleave.
    """
    episodes: dict[Any, list[dict[str, Any]]] = {}
    for line in lines:
        episodes.setdefault(line.get("episode"), []).append(line)
    yield from episodes.values()


def _video_codec() -> str:
    """The first of :data:`VIDEO_CODECS` that PyAV (LeRobot's video writer) can encode with here."""
    try:
        import av
    except ImportError as exc:
        raise VideoUnavailable(f"--video needs PyAV, which LeRobot's dataset writer encodes videos with (pip install av): {exc}; export without --video to store images") from None
    for codec in VIDEO_CODECS:
        try:
            av.codec.Codec(codec, "w")
        except Exception:  # PyAV raises UnknownCodecError (a ValueError) or FFmpeg errors
            continue
        return codec
    raise VideoUnavailable(
        f"--video: the FFmpeg inside PyAV {av.__version__} has none of the encoders {', '.join(VIDEO_CODECS)}; export without --video to store images"
    )


def video_decoder() -> tuple[str | None, str]:
    """The backend ``LeRobotDataset(..., video_backend=...)`` can decode videos with here, and a note on the others.

    LeRobot picks ``torchcodec`` whenever it is installed, even where its
    native library does not load; ``pyav`` (through torchvision) is the
    fallback. Returns ``(None, why)`` when neither works.
    """
    problems = []
    try:
        import torchcodec.decoders  # noqa: F401  (loads the native library)
    except Exception as exc:  # ImportError, or RuntimeError/OSError from the native library
        problems.append(f"torchcodec does not load ({_first_line(exc)})")
    else:
        return "torchcodec", ""
    try:
        import av  # noqa: F401
        import torchvision

        if not hasattr(torchvision.io, "VideoReader"):
            raise ImportError(f"torchvision {torchvision.__version__} has no io.VideoReader")
    except Exception as exc:
        problems.append(f"pyav through torchvision does not work ({_first_line(exc)})")
        return None, "; ".join(problems)
    return "pyav", "; ".join(problems)


def _first_line(exc: BaseException) -> str:
    """The exception's type and first sentence (native-library errors run to many lines)."""
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".:") if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


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


def _features(first: _Row, cameras: list[str], session: Path, video: bool) -> dict[str, dict[str, Any]]:
    state_dim, action_dim = len(first.observation["state"]), len(first.action)
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
