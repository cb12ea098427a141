"""``policylink export``: turn a recorded session into a LeRobot dataset."""

from __future__ import annotations

import argparse
from typing import Any

HELP = """\
Export a session folder written by --record (metadata.json,
inference_log.jsonl, images/) as a LeRobot dataset, with LeRobot's own
dataset writer, into OUT_DIR (a new local folder; nothing is uploaded).

Load it back with:
  LeRobotDataset(REPO_ID, root=OUT_DIR)

Needs the [server] extra (LeRobot).
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
    parser.add_argument("--video", action="store_true", help="store cameras as video (needs a working video encoder) instead of images")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..record import export_lerobot

    summary = export_lerobot(args.session, args.out, repo_id=args.repo_id, fps=args.fps, task=args.task, video=args.video, robot_type=args.robot_type)
    cameras = ", ".join(summary.cameras) or "no camera"
    print(f"export: wrote {summary.episodes} episodes, {summary.frames} frames at {summary.fps} fps ({cameras}) to {summary.root}")
    if summary.skipped_steps or summary.filled_frames:
        print(f"export: left out {summary.skipped_steps} steps without an action; reused the previous image for {summary.filled_frames} dropped frames")
    print(f"export: load it with LeRobotDataset({summary.repo_id!r}, root={str(summary.root)!r})")
    return 0
