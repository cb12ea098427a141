"""What the monitor knows about the loop: a listener that keeps the last seconds.

:class:`MonitorState` is called from the control thread, so ``on_step`` only
appends a few numbers to ring buffers and keeps a reference to the newest
camera frames. JPEG encoding happens on the monitor's own encoder thread
(:meth:`MonitorState.encode_frames`), at the page's frame rate, not the loop's.

Camera names travel to the page as JSON, are shown with ``textContent`` and
come back percent-encoded in ``/frame/<name>.jpg``, so any name that
round-trips through UTF-8 works (slashes, ``..``, spaces, quotes, non-ASCII).
A name no URL or page can carry faithfully (see :func:`camera_name_problem`)
is refused where the monitor first sees it: logged once, listed in the
status under ``cameras_refused``, and its frames are not served.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import unicodedata
from typing import Any

import numpy as np

from ..media import camera_frames, encode_jpeg, jpeg_available, state_vector
from ..runtime.events import ChunkEvent, EpisodeEvent, StepEvent

__all__ = ["MonitorState", "camera_name_problem", "MAX_CAMERA_NAME"]

logger = logging.getLogger("policylink.monitor")

#: The longest camera name the page addresses (its URL is at most ~12 bytes per character).
MAX_CAMERA_NAME = 100


def camera_name_problem(name: object) -> str | None:
    """Why the page cannot address camera ``name``, or ``None`` when it can.

    Refused: non-strings, the empty name, names over :data:`MAX_CAMERA_NAME`
    characters, and names with control, format (e.g. bidirectional overrides,
    zero-width), private-use, unassigned or surrogate code points, which do
    not survive UTF-8 or would show as something else. Everything else is
    percent-encoded in the frame's URL and shown as text.
    """
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "the name is empty"
    if len(name) > MAX_CAMERA_NAME:
        return f"longer than {MAX_CAMERA_NAME} characters ({len(name)})"
    for char in name:
        category = unicodedata.category(char)
        if category.startswith("C"):
            kind = {"Cc": "a control", "Cf": "an invisible formatting", "Cs": "a surrogate", "Co": "a private-use", "Cn": "an unassigned"}[category]
            return f"contains {kind} character (U+{ord(char):04X})"
    return None


def _floats(value: Any) -> list[float] | None:
    return None if value is None else np.asarray(value, dtype=np.float64).reshape(-1).round(5).tolist()


class MonitorState:
    """Ring buffers of steps, chunks and latencies, plus the latest frames.

    ``window_s`` is how much history the page plots; ``max_samples`` caps it
    for fast loops. Every sample carries a sequence number so that each page
    receives only what it has not seen.
    """

    def __init__(self, window_s: float = 10.0, max_samples: int = 2000, jpeg_quality: int = 80) -> None:
        self.window_s = window_s
        self.jpeg_quality = jpeg_quality
        self.can_encode = jpeg_available()
        self._lock = threading.Lock()
        self._seq = 0
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_samples)
        self._latencies: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_samples)
        self._step_times: collections.deque[float] = collections.deque(maxlen=256)
        self._chunk: dict[str, Any] | None = None
        self._status: dict[str, Any] = {"episode": 0, "step": 0, "success": False, "reward": 0.0, "done": False, "episodes_done": 0, "successes": 0}
        self._raw_frames: dict[str, np.ndarray] = {}
        self._raw_frame_step = -1
        self._jpegs: dict[str, tuple[int, bytes]] = {}
        self._encoded_step = -1
        self.frames_encoded = 0
        #: Camera name -> why the page cannot address it (None: it can); checked once per name.
        self._camera_names: dict[str, str | None] = {}
        self._cameras_refused: dict[str, str] = {}
        # Replay: |served - recorded| over the episode so far.
        self._replay_steps = 0
        self._replay_sum = 0.0
        self._replay_max = 0.0

    # -- listener (control thread) ----------------------------------------

    def on_step(self, event: StepEvent, recorded: Any = None) -> None:
        """A step; ``recorded`` is the recorded action the executed one replays (a replayed episode), if any."""
        frames = camera_frames(event.observation)
        if frames and any(name not in self._camera_names for name in frames):
            self._check_camera_names(frames)
        if frames and self._cameras_refused:
            frames = {name: frame for name, frame in frames.items() if self._camera_names.get(name) is None}
        sample = {
            "t": event.time, "episode": event.episode, "step": event.step,
            "state": _floats(state_vector(event.observation)), "action": _floats(event.action),
            "chunk_id": event.chunk_id, "fresh": bool(event.fresh),
        }
        error = None
        if recorded is not None and event.action is not None:
            recorded = np.asarray(recorded, np.float32).reshape(-1)
            served = np.asarray(event.action, np.float32).reshape(-1)
            if served.shape == recorded.shape:
                sample["recorded"] = _floats(recorded)
                error = np.abs(served - recorded)
        with self._lock:
            if error is not None:
                self._replay_steps += 1
                self._replay_sum += float(error.mean())
                self._replay_max = max(self._replay_max, float(error.max()))
                self._status["replay"] = {"steps": self._replay_steps, "mean_abs_error": round(self._replay_sum / self._replay_steps, 6),
                                          "max_abs_error": round(self._replay_max, 6)}
            self._seq += 1
            sample["seq"] = self._seq
            self._samples.append(sample)
            self._step_times.append(time.monotonic())
            self._status.update(episode=event.episode, step=event.step, success=bool(event.success), reward=float(event.reward), done=bool(event.done))
            if event.latencies:
                self._status["latencies"] = {key: round(float(value), 2) for key, value in event.latencies.items()}
            if frames:
                self._raw_frames = frames
                self._raw_frame_step = self._seq

    def on_chunk(self, event: ChunkEvent) -> None:
        chunk = {
            "chunk_id": event.chunk_id, "episode": event.episode, "obs_step": event.obs_step, "accepted": bool(event.accepted),
            "reason": event.reason, "t": time.time(), "actions": np.asarray(event.actions, np.float64).round(5).tolist(),
        }
        latency = {"t": chunk["t"], "roundtrip_ms": round(float(event.roundtrip_ms), 2)}
        latency.update({key: round(float(value), 2) for key, value in event.server_timing.items() if key in ("infer_ms", "queue_ms")})
        with self._lock:
            self._seq += 1
            chunk["seq"] = latency["seq"] = self._seq
            self._chunk = chunk
            self._latencies.append(latency)

    def on_episode(self, event: EpisodeEvent) -> None:
        with self._lock:
            if event.started:
                self._status.update(episode=event.episode, step=0, success=False, done=False)
                if self._replay_steps:  # the replay restarts: so does its comparison
                    self._replay_steps, self._replay_sum, self._replay_max = 0, 0.0, 0.0
                    self._status["replay"] = {"steps": 0}
            else:
                self._status["episodes_done"] += 1
                self._status["successes"] += int(bool(event.success))
                self._status.update(last_episode={"episode": event.episode, "steps": event.steps, "success": bool(event.success), "total_reward": float(event.total_reward)})

    def _check_camera_names(self, frames: dict[str, Any]) -> None:
        for name in frames:
            if name in self._camera_names:
                continue
            problem = camera_name_problem(name)
            self._camera_names[name] = problem
            if problem is not None:
                with self._lock:
                    self._cameras_refused[ascii(name)] = problem
                logger.warning("monitor: camera %s is not shown: the page cannot address its name: %s", ascii(name), problem)

    # -- encoder thread ---------------------------------------------------

    def encode_frames(self) -> bool:
        """JPEG-encode the newest frames if they changed; returns whether it did."""
        with self._lock:
            if self._raw_frame_step == self._encoded_step or not self.can_encode:
                return False
            frames, step = self._raw_frames, self._raw_frame_step
        encoded = {name: (step, encode_jpeg(frame, self.jpeg_quality)) for name, frame in frames.items()}
        with self._lock:
            self._jpegs.update(encoded)
            self._encoded_step = step
            self.frames_encoded += 1
        return True

    def jpeg(self, camera: str) -> tuple[int, bytes] | None:
        """``(sequence, jpeg bytes)`` of a camera's newest encoded frame."""
        with self._lock:
            return self._jpegs.get(camera)

    # -- page updates -----------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Episode, step, success, loop rate (steps per second over the last 2 s)."""
        with self._lock:
            return self._status_locked()

    def _status_locked(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = [t for t in self._step_times if now - t <= 2.0]
        loop_hz = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 and recent[-1] > recent[0] else 0.0
        if loop_hz and now - recent[-1] > max(0.5, 3.0 / loop_hz):
            loop_hz = 0.0  # the loop stopped: do not keep showing its last rate
        status = {**self._status, "loop_hz": round(loop_hz, 2)}
        if self._cameras_refused:
            status["cameras_refused"] = dict(self._cameras_refused)
        return status

    def update(self, since: int) -> tuple[int, dict[str, Any]]:
        """Everything newer than sequence ``since``, and the new cursor."""
        with self._lock:
            message: dict[str, Any] = {
                "samples": [sample for sample in self._samples if sample["seq"] > since],
                "latencies": [item for item in self._latencies if item["seq"] > since],
                "status": self._status_locked(),
                "frames": {name: seq for name, (seq, _) in self._jpegs.items()},
            }
            if self._chunk is not None and self._chunk["seq"] > since:
                message["chunk"] = self._chunk
            return self._seq, message

    def cameras(self) -> list[str]:
        with self._lock:
            return sorted(set(self._jpegs) | set(self._raw_frames))
