"""What the monitor knows about the loop: a listener that keeps the last seconds.

:class:`MonitorState` is called from the control thread, so ``on_step`` only
appends a few numbers to ring buffers and keeps a reference to the newest
camera frames. JPEG encoding happens on the monitor's own encoder thread
(:meth:`MonitorState.encode_frames`), at the page's frame rate, not the loop's.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

from ..media import camera_frames, encode_jpeg, jpeg_available, state_vector
from ..runtime.events import ChunkEvent, EpisodeEvent, StepEvent

__all__ = ["MonitorState"]


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

    # -- listener (control thread) ----------------------------------------

    def on_step(self, event: StepEvent) -> None:
        frames = camera_frames(event.observation)
        sample = {
            "t": event.time, "episode": event.episode, "step": event.step,
            "state": _floats(state_vector(event.observation)), "action": _floats(event.action),
            "chunk_id": event.chunk_id, "fresh": bool(event.fresh),
        }
        with self._lock:
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
            else:
                self._status["episodes_done"] += 1
                self._status["successes"] += int(bool(event.success))
                self._status.update(last_episode={"episode": event.episode, "steps": event.steps, "success": bool(event.success), "total_reward": float(event.total_reward)})

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
        return {**self._status, "loop_hz": round(loop_hz, 2)}

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
