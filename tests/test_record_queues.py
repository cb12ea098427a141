"""The recorder's log-line queue is bounded by memory; what it drops is counted and reported.

A log file whose writes block (a stalled disk) holds the line writer while
the test, playing the control loop, sends the recorder its events: they must
return at once, the queued lines must stay within ``max_queued_log_bytes``,
and the dropped lines must be counted in ``metadata.json``, logged at close,
and reported by ``policylink export``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from policylink.record import SessionRecorder
from policylink.record.session import LINE_OVERHEAD_BYTES
from policylink.runtime.events import ChunkEvent, EpisodeEvent, StepEvent

STEPS = 50
CHUNKS = 3
KEPT = 10  # step lines the bound leaves room for


class StalledLog:
    """Opens log files whose first write blocks until :attr:`released`; ``entered``: that write has begun."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.completed = 0

    def __call__(self, path: Path) -> IO[str]:
        return _StalledFile(self, open(path, "a", encoding="utf-8"))  # noqa: SIM115 (closed by the recorder)


class _StalledFile:
    def __init__(self, owner: StalledLog, file: IO[str]) -> None:
        self.owner, self.file = owner, file

    def write(self, text: str) -> int:
        self.owner.entered.set()
        assert self.owner.released.wait(30), "the test never released the stalled log"
        written = self.file.write(text)
        self.owner.completed += 1
        return written

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def step_event(step: int) -> StepEvent:
    vector = np.full(6, step, np.float32)
    return StepEvent(0, step, time.time(), {"observation.state": vector}, vector.copy(), 1 + step // 8, True)


def record_on_stalled_log(root: Path) -> tuple[SessionRecorder, StalledLog]:
    log = StalledLog()
    step_cost = LINE_OVERHEAD_BYTES + 2 * 6 * 4  # a line's estimate: overhead plus its state and action (float32)
    recorder = SessionRecorder(root, {"client": {"fps": 30}}, images=False, max_queued_log_bytes=KEPT * step_cost, log_opener=log)
    recorder.on_episode(EpisodeEvent(0, started=True))
    recorder.on_step(step_event(0))
    assert log.entered.wait(10), "the line writer never started writing"
    # The writer is stuck in its first write: everything from here on queues, up to the bound, or is dropped.
    for step in range(1, STEPS):
        recorder.on_step(step_event(step))
        if step % 16 == 0:
            recorder.on_chunk(ChunkEvent(0, 1 + step // 16, step, np.zeros((50, 14), np.float32), True))
    recorder.on_episode(EpisodeEvent(0, started=False, steps=STEPS))
    # The loop never waited for the disk: not one write has finished yet.
    assert log.completed == 0
    return recorder, log


def test_log_queue_is_bounded_by_memory_and_drops_are_counted(tmp_path: Path, caplog: Any) -> None:
    recorder, log = record_on_stalled_log(tmp_path)
    stats = recorder.stats
    assert stats.steps == STEPS and stats.chunks == CHUNKS
    # The line being written still counts until it is on disk: KEPT lines in all fit the bound.
    assert (stats.step_lines_dropped, stats.chunk_lines_dropped) == (STEPS - KEPT, CHUNKS)
    log.released.set()
    with caplog.at_level(logging.WARNING, logger="policylink.record"):
        recorder.close()
    assert f"dropped 0 frames, {STEPS - KEPT} step lines, {CHUNKS} chunk lines" in caplog.text

    lines = [json.loads(text) for text in (recorder.path / "inference_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(KEPT))
    assert lines[3]["state"] == [3.0] * 6 and lines[3]["action"] == [3.0] * 6
    assert not (recorder.path / "chunks.jsonl").exists()
    metadata = json.loads((recorder.path / "metadata.json").read_text())
    assert metadata["stats"]["step_lines_dropped"] == STEPS - KEPT and metadata["stats"]["chunk_lines_dropped"] == CHUNKS
    assert recorder._queued_bytes == 0  # every written line gave its memory back


def test_queued_lines_within_the_bound_are_all_written(tmp_path: Path) -> None:
    """A disk that is only slow loses nothing: once released, every queued line reaches the file, in order."""
    log = StalledLog()
    recorder = SessionRecorder(tmp_path, images=False, log_opener=log)  # the default bound: 16 MiB
    for step in range(200):
        recorder.on_step(step_event(step))
    log.released.set()
    recorder.close()
    lines = [json.loads(text) for text in (recorder.path / "inference_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(200)) and recorder.stats.lines_dropped == 0


@pytest.mark.lerobot
def test_export_reports_what_the_recording_dropped(tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from policylink.cli import main

    recorder, log = record_on_stalled_log(tmp_path / "sessions")
    log.released.set()
    recorder.close()
    assert main(["export", str(recorder.path), str(tmp_path / "dataset"), "--repo-id", "local/dropped"]) == 0
    output = capsys.readouterr().out
    assert f"wrote 1 episodes, {KEPT} frames at 30 fps (no camera)" in output
    assert f"0 frames, {STEPS - KEPT} step lines and {CHUNKS} chunk lines were dropped" in output
    assert f"{STEPS - KEPT} steps are missing from the log" in output
    assert LeRobotDataset("local/dropped", root=tmp_path / "dataset").num_frames == KEPT
