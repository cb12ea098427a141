"""``policylink export``: turn a recorded session into a LeRobot dataset."""

from __future__ import annotations

import argparse
from typing import Any

HELP = """\
Export a session folder written by --record (metadata.json,
inference_log.jsonl, images/) as a LeRobot dataset, with LeRobot's own
dataset writer, into OUT_DIR (a new local folder; nothing is uploaded).

Frame t of each episode holds the observation at step t (frame 0: the
episode's reset observation) and the action executed at step t, the one
chosen from that observation (LeRobot's convention). Sessions recorded
before that convention (format 1) are realigned.

Load it back with:
  LeRobotDataset(REPO_ID, root=OUT_DIR)
(with --video, where torchcodec does not load: video_backend="pyav").

Needs the [server] extra (LeRobot); --video needs PyAV with an AV1 or
H.264 encoder.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export", help="export a recorded session as a LeRobot dataset", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("session", metavar="SESSION_DIR", help="a session folder written by --record")
    parser.add_argument("out", metavar="OUT_DIR", help="where to write the dataset (must not exist)")
    parser.add_argument("--repo-id", default=None, help="the dataset's repo id (default: local/<session folder name>)")
    parser.add_argument("--fps", type=int, default=None, help="frame rate of the dataset (default: the recorded control rate)")
    parser.add_argument("--task", default=None, help="task text for steps that recorded none (default: the session's task)")
    parser.add_argument("--robot-type", default=None, help="robot type written into the dataset's info")
    parser.add_argument("--video", action="store_true", help="store cameras as video (AV1, else H.264, through PyAV) instead of images")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..record import export_lerobot

    summary = export_lerobot(args.session, args.out, repo_id=args.repo_id, fps=args.fps, task=args.task, video=args.video, robot_type=args.robot_type)
    cameras = ", ".join(summary.cameras) or "no camera"
    print(f"export: wrote {summary.episodes} episodes, {summary.frames} frames at {summary.fps} fps ({cameras}) to {summary.root}")
    if summary.realigned:
        print(
            f"export: the session is of format {summary.format_version} (each line paired an action with the observation after it): "
            "realigned each action with the observation it was chosen from; the first step of each episode had none recorded and is left out"
        )
    if summary.skipped_steps or summary.filled_frames:
        print(f"export: left out {summary.skipped_steps} steps without an action or observation; reused the previous image for {summary.filled_frames} dropped frames")
    drops = summary.recorded_drops
    if any(drops.values()) or summary.missing_steps:
        print(
            f"export: while recording, {drops.get('frames_dropped', 0)} frames, {drops.get('step_lines_dropped', 0)} step lines and "
            f"{drops.get('chunk_lines_dropped', 0)} chunk lines were dropped (the disk did not keep up); "
            f"{summary.missing_steps} steps are missing from the log"
        )
    if summary.video_codec:
        print(f"export: videos encoded with {summary.video_codec}")
        if summary.video_backend is None:
            print(f"export: warning: no video decoder works here ({summary.video_note}); the dataset loads where torchcodec or PyAV does")
        elif summary.video_backend != "torchcodec":
            print(f"export: {summary.video_note}: decode the videos with video_backend={summary.video_backend!r}")
    print(f"export: load it with {summary.load_hint()}")
    return 0
