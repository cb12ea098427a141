"""Record a control session to disk: metadata, one JSON line per step, JPEG frames.

A session folder looks like::

    20261123-061502-a1b2/
        metadata.json          policy, server, client settings, versions, start (and end) time
        inference_log.jsonl    one line per control step
        chunks.jsonl           one line per chunk received from the server
        images/frame_000000/front.jpg
        images/frame_000000/wrist.jpg
        ...

A line of ``inference_log.jsonl`` is one control step ``t`` of an episode
(``step`` counts from 0) in LeRobot's convention: the observation *before*
the action (``state``, the images of ``frame_index``; at step 0 the
episode's reset observation), the action executed at ``t`` (chosen from
that observation), and what followed it (``reward``, ``success``,
``done``). The observation after an episode's last action has no line.

:class:`SessionRecorder` is a :class:`~policylink.runtime.events.LoopListener`.
The control thread only copies a few small arrays into a dict and puts it on
a queue; JSON lines and images are written by two threads of their own. Both
queues are bounded, the images by a number of steps, the lines by an
estimate of their memory: when the disk cannot keep up, frames (the step's
line says so) or whole lines are dropped and counted in ``metadata.json``
(``stats``), and the loop never waits.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import platform
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..media import JPEG_MISSING, camera_frames, encode_jpeg, jpeg_available, state_vector
from ..runtime.events import ChunkEvent, EpisodeEvent, StepEvent

__all__ = [
    "SessionRecorder", "RecorderStats", "METADATA_FILE", "LOG_FILE", "CHUNKS_FILE", "IMAGES_DIR", "FORMAT_VERSION",
    "DEFAULT_MAX_QUEUED_LOG_BYTES", "LINE_OVERHEAD_BYTES", "frame_path",
]

logger = logging.getLogger("policylink.record")

METADATA_FILE = "metadata.json"
LOG_FILE = "inference_log.jsonl"
CHUNKS_FILE = "chunks.jsonl"
IMAGES_DIR = "images"
#: Version of the session folder layout, written into metadata.json. Version 1
#: (before policylink recorded the observation an action was chosen from) paired
#: each action with the observation *after* it and counted steps from 1.
FORMAT_VERSION = 2
#: Default bound of the memory that log lines waiting for the disk may hold.
DEFAULT_MAX_QUEUED_LOG_BYTES = 16 * 1024 * 1024
#: What a queued line costs beyond its arrays (the dict and its small values), an estimate: a step
#: line with two cameras and 12-d vectors measures about 1.8 KiB in all.
LINE_OVERHEAD_BYTES = 2048

#: Writes ``data`` to ``path``; replaceable in tests to simulate a slow disk.
FileWriter = Callable[[Path, bytes], None]
#: Opens a log file (``inference_log.jsonl``, ``chunks.jsonl``) for appending text; replaceable in tests.
LogOpener = Callable[[Path], IO[str]]


def frame_path(frame_index: int, camera: str) -> str:
    """Path of one camera image, relative to the session folder."""
    return f"{IMAGES_DIR}/frame_{frame_index:06d}/{camera}.jpg"


class RecorderStats:
    """Counters of one recording (read them from any thread)."""

    def __init__(self) -> None:
        self.steps = 0
        self.chunks = 0
        self.episodes = 0
        self.frames_written = 0
        self.frames_dropped = 0
        #: Lines of inference_log.jsonl / chunks.jsonl not written: their queue was full (a disk that cannot keep up).
        self.step_lines_dropped = 0
        self.chunk_lines_dropped = 0
        self.write_errors = 0

    @property
    def lines_dropped(self) -> int:
        return self.step_lines_dropped + self.chunk_lines_dropped

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def summary(self) -> str:
        """One line: what was recorded and what was dropped."""
        return (
            f"{self.steps} steps, {self.frames_written} images; dropped {self.frames_dropped} frames, "
            f"{self.step_lines_dropped} step lines, {self.chunk_lines_dropped} chunk lines; {self.write_errors} write errors"
        )


class SessionRecorder:
    """Writes one session folder under ``root``; a loop listener.

    ``metadata`` is merged into ``metadata.json`` (put the policy metadata
    under ``"policy"``, the server URL under ``"server"`` and the client's
    settings under ``"client"``). ``max_queued_frames`` bounds how many steps
    of images may wait for the disk, ``max_queued_log_bytes`` the memory the
    log lines waiting for it may hold (estimated: the lines' arrays plus 2 KiB
    each; 16 MiB holds minutes of a 30 Hz loop). What does not fit is
    dropped and counted (:attr:`stats`, ``metadata.json``). ``images=False``
    records no frames. Call :meth:`close` (or use ``with``) to flush and write
    the final counts.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        images: bool = True,
        jpeg_quality: int = 90,
        max_queued_frames: int = 64,
        max_queued_log_bytes: int = DEFAULT_MAX_QUEUED_LOG_BYTES,
        file_writer: FileWriter | None = None,
        log_opener: LogOpener | None = None,
    ) -> None:
        if max_queued_frames < 1 or max_queued_log_bytes < LINE_OVERHEAD_BYTES:
            raise ValueError(f"need max_queued_frames >= 1 and max_queued_log_bytes >= {LINE_OVERHEAD_BYTES}, got {max_queued_frames} and {max_queued_log_bytes}")
        if images and not jpeg_available():
            raise ImportError(f"recording camera images: {JPEG_MISSING}; or record without images")
        self.started = time.time()
        self.path = Path(root) / (name or _session_name(self.started))
        self.path.mkdir(parents=True, exist_ok=False)
        self.images = images
        self.jpeg_quality = jpeg_quality
        self.stats = RecorderStats()
        self._write_file = file_writer or _write_file
        self._open_log = log_opener or _open_log
        self._frame_ids = itertools.count()
        # Several loops may share one recorder (parallel evaluation): keep the counts exact.
        self._count_lock = threading.Lock()
        self._metadata = self._initial_metadata(metadata or {})
        self._write_metadata()
        # Lines are bounded by the memory they hold (``_queued_bytes``, under ``_count_lock``),
        # not by their number: a chunk line holds a whole chunk, a step line two small vectors.
        self.max_queued_log_bytes = max_queued_log_bytes
        self._queued_bytes = 0
        self._lines: queue.Queue[tuple[str, dict[str, Any], int] | None] = queue.Queue()
        self._frames: queue.Queue[tuple[int, dict[str, np.ndarray]] | None] = queue.Queue(maxsize=max_queued_frames)
        self._threads = [
            threading.Thread(target=self._line_writer, name="policylink-record-log", daemon=True),
            threading.Thread(target=self._frame_writer, name="policylink-record-images", daemon=True),
        ]
        self._closed = False
        for thread in self._threads:
            thread.start()
        logger.info("recording session to %s", self.path)

    # -- listener (control thread: no I/O here) ---------------------------

    def on_step(self, event: StepEvent) -> None:
        """Step ``t``: the observation the action was chosen from, the action, and what followed."""
        with self._count_lock:
            self.stats.steps += 1
        # Copies: the environment may reuse its buffers; the writer thread turns them into JSON.
        state = _copy(state_vector(event.observation))
        action = _copy(event.action)
        cost = LINE_OVERHEAD_BYTES + _nbytes(state) + _nbytes(action)
        if not self._reserve(cost):
            # The lines' queue is full: drop the whole step (its frames too: no line would name them).
            with self._count_lock:
                self.stats.step_lines_dropped += 1
            return
        line: dict[str, Any] = {
            "time": event.time,
            "episode": event.episode,
            "step": event.step,
            "state": state,
            "action": action,
            "chunk_id": event.chunk_id,
            "fresh": bool(event.fresh),
            "reward": float(event.reward),
            "success": bool(event.success),
            "done": bool(event.done),
            "latencies": {key: round(float(value), 3) for key, value in event.latencies.items()},
        }
        task = event.observation.get("task") or event.observation.get("prompt")
        if isinstance(task, str):
            line["task"] = task
        frames = camera_frames(event.observation) if self.images else {}
        if frames:
            line.update(self._queue_frames(frames))
        self._put_line(LOG_FILE, line, cost)

    def on_chunk(self, event: ChunkEvent) -> None:
        with self._count_lock:
            self.stats.chunks += 1
        actions = np.array(event.actions, dtype=np.float32)
        cost = LINE_OVERHEAD_BYTES + actions.nbytes
        if not self._reserve(cost):
            with self._count_lock:
                self.stats.chunk_lines_dropped += 1
            return
        self._put_line(CHUNKS_FILE, {
            "time": time.time(),
            "episode": event.episode,
            "chunk_id": event.chunk_id,
            "obs_step": event.obs_step,
            "accepted": bool(event.accepted),
            "reason": event.reason,
            "roundtrip_ms": round(float(event.roundtrip_ms), 3),
            "server_timing": {key: round(float(value), 3) for key, value in event.server_timing.items()},
            "actions": actions,
        }, cost)

    def on_episode(self, event: EpisodeEvent) -> None:
        if event.started:
            return
        with self._count_lock:
            self.stats.episodes += 1
            self._metadata.setdefault("episodes", []).append({
                "episode": event.episode, "steps": event.steps, "success": bool(event.success), "total_reward": float(event.total_reward),
            })

    def _queue_frames(self, frames: dict[str, np.ndarray]) -> dict[str, Any]:
        frame_index = next(self._frame_ids)
        try:
            # Copy: an environment may reuse its image buffers for the next step.
            self._frames.put_nowait((frame_index, {name: np.array(frame) for name, frame in frames.items()}))
        except queue.Full:
            with self._count_lock:
                self.stats.frames_dropped += 1
            return {"frame_index": frame_index, "images": {}, "frame_dropped": True}
        return {"frame_index": frame_index, "images": {name: frame_path(frame_index, name) for name in frames}}

    def _reserve(self, cost: int) -> bool:
        """Count ``cost`` bytes against the lines' bound; False (nothing counted) when it does not fit."""
        with self._count_lock:
            if self._closed or self._queued_bytes + cost > self.max_queued_log_bytes:
                return False
            self._queued_bytes += cost
            return True

    def _put_line(self, file: str, line: dict[str, Any], cost: int) -> None:
        """Queue a line whose ``cost`` is reserved; not after :meth:`close` queued the writer's end."""
        with self._count_lock:
            if not self._closed:
                self._lines.put((file, line, cost))  # unbounded: never blocks (the bound is ``_reserve``'s)
                return
            self._queued_bytes -= cost
            if file == LOG_FILE:
                self.stats.step_lines_dropped += 1
            else:
                self.stats.chunk_lines_dropped += 1

    # -- writer threads ---------------------------------------------------

    def _line_writer(self) -> None:
        files: dict[str, Any] = {}
        try:
            while (item := self._lines.get()) is not None:
                file, line, cost = item
                try:
                    if file not in files:
                        files[file] = self._open_log(self.path / file)
                    files[file].write(json.dumps(line, separators=(",", ":"), default=_json_array) + "\n")
                    if self._lines.empty():
                        for handle in files.values():
                            handle.flush()
                except Exception:  # a full disk must not kill the recorder thread
                    with self._count_lock:
                        self.stats.write_errors += 1
                    logger.exception("could not write a line of %s", file)
                finally:
                    with self._count_lock:
                        self._queued_bytes -= cost
        finally:
            for handle in files.values():
                handle.close()

    def _frame_writer(self) -> None:
        while (item := self._frames.get()) is not None:
            frame_index, frames = item
            for camera, frame in frames.items():
                try:
                    target = self.path / frame_path(frame_index, camera)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._write_file(target, encode_jpeg(frame, self.jpeg_quality))
                except Exception:  # a full disk must not kill the recorder thread
                    with self._count_lock:
                        self.stats.write_errors += 1
                    logger.exception("could not write frame %d of camera %s", frame_index, camera)
                else:
                    with self._count_lock:
                        self.stats.frames_written += 1

    # -- metadata ---------------------------------------------------------

    def _initial_metadata(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "format": "policylink-session",
            "format_version": FORMAT_VERSION,
            # Each line of inference_log.jsonl: the observation at step t, the action chosen from it, what followed.
            "step_convention": "observation_before_action",
            "session": self.path.name,
            "start_time": _iso(self.started),
            "start_timestamp": self.started,
            "versions": _versions(),
            "host": platform.node(),
        }
        metadata.update(_jsonable(dict(extra)))
        return metadata

    def _write_metadata(self) -> None:
        tmp = self.path / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(self._metadata, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path / METADATA_FILE)

    def update_metadata(self, **fields: Any) -> None:
        """Add fields to ``metadata.json`` (written now and again at close)."""
        self._metadata.update(_jsonable(fields))
        self._write_metadata()

    def close(self) -> None:
        """Write what is queued, stop the writer threads, and finish metadata.json."""
        with self._count_lock:
            if self._closed:
                return
            self._closed = True  # events arriving from now on are dropped (and counted)
            self._lines.put(None)  # under the lock: no line can be queued behind it
        self._frames.put(None)
        for thread in self._threads:
            thread.join()
        ended = time.time()
        self._metadata.update({"end_time": _iso(ended), "duration_s": round(ended - self.started, 3), "stats": self.stats.to_dict()})
        self._write_metadata()
        stats = self.stats
        if stats.frames_dropped or stats.lines_dropped or stats.write_errors:
            logger.warning("session %s: %s (the disk did not keep up)", self.path, stats.summary())
        else:
            logger.info("session %s: %s", self.path, stats.summary())

    def __enter__(self) -> SessionRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _open_log(path: Path) -> IO[str]:
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 (the line writer closes it)


def _copy(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value).reshape(-1).copy()


def _nbytes(value: np.ndarray | None) -> int:
    return 0 if value is None else value.nbytes


def _json_array(value: Any) -> Any:
    """JSON for the arrays the control thread queued: numbers rounded to 6 decimals."""
    if isinstance(value, np.ndarray):
        return np.asarray(value, dtype=np.float64).round(6).tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _session_name(started: float) -> str:
    stamp = datetime.datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _versions() -> dict[str, str]:
    from importlib import metadata as importlib_metadata

    versions = {"python": platform.python_version()}
    for package in ("policylink", "numpy", "websockets", "msgpack", "lerobot", "torch"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _jsonable(value: Any) -> Any:
    """``value`` with numpy arrays, tuples, paths and dataclass-likes turned into JSON types."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return str(value)
