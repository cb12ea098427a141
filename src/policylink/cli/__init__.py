"""The ``policylink`` command line.

Each subcommand is a module of this package with ``add_parser(subparsers)``;
flags follow the field's dotted style (``--policy.path``, ``--policy.type``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

__all__ = ["main", "build_parser"]

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("serve", "infer", "run", "demo", "inspect", "eval", "export")

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
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="logging verbosity (default: info)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # print a clear one-line error, not a traceback
        if args.log_level == "debug":
            raise
        print(f"policylink {args.command}: error: {exc}", file=sys.stderr)
        return 1
