"""The ``policylink`` command line.

Each subcommand is a module of this package with ``add_parser(subparsers)``;
flags follow the field's dotted style (``--policy.path``, ``--policy.type``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import re
import sys

from .config import CONFIGURABLE, apply_config, effective_config

__all__ = ["main", "build_parser"]

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("serve", "infer", "run", "demo", "inspect", "eval", "export", "status")

DESCRIPTION = """\
policylink: remote inference for learned robot policies.

A policy runs on a server (GPU box); a robot or simulator elsewhere sends
observations and executes the action chunks that come back.
"""

EPILOG = """\
examples:
  policylink serve --policy.type replay --port 8000     serve a built-in policy
  policylink serve                                      idle server, clients choose the model
  policylink infer --server ws://127.0.0.1:8000         one request, print the chunk and timing
  policylink run --server ws://HOST:8000 --mode async   drive a fake arm at 30 Hz, print loop statistics
  policylink demo                                       local server + client, no checkpoint needed
  policylink inspect CHECKPOINT_DIR                     what a LeRobot checkpoint expects and returns
  policylink eval --env pusht --policy.type random      run episodes in a simulator, print success rate
  policylink export out/SESSION out/dataset             a recorded session as a LeRobot dataset
  policylink status ws://HOST:8000                      a server's health, models, clients and latency
  policylink serve --config server.yaml                 every flag from a YAML file (POLICYLINK_* variables too)
"""


#: A value that starts with a minus sign: a negative number or a list of numbers (``-3,3``, ``-0.5``, ``-1e-3``).
_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d)[\d.eE+\-,:]*$")


def join_negative_values(argv: list[str]) -> list[str]:
    """``--flag -3,3`` as ``--flag=-3,3``: argparse takes a value like ``-3,3`` for an unknown option."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if _NEGATIVE_VALUE.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policylink", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging verbosity; per-request lines are at debug (default: info)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="log lines as text or as one JSON object each (default: text)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def configure_logging(level: str, form: str = "text") -> None:
    """Root logging at ``level``; the websockets library's per-connection lines only at debug (ours say more)."""
    handler = logging.StreamHandler()
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if level != "debug":
        logging.getLogger("websockets").setLevel(logging.WARNING)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return dict(action.choices)


def _after_command(argv: list[str], command: str) -> list[str]:
    """The arguments after the command name (the global options before it take a value each)."""
    index = 0
    while index < len(argv) and argv[index] != command:
        index += 1 if "=" in argv[index] or not argv[index].startswith("--") else 2
    return argv[index + 1:]


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        if args.command in CONFIGURABLE:
            command_parser = _subparsers(parser)[args.command]
            apply_config(args, command_parser, _after_command(argv, args.command))
            if args.print_config:
                print(effective_config(args, command_parser), end="")
                return 0
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # print a clear one-line error, not a traceback
        if args.log_level == "debug":
            raise
        print(f"policylink {args.command}: error: {exc}", file=sys.stderr)
        return 1
