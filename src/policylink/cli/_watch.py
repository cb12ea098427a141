"""``--monitor`` and ``--record``: the flags shared by ``run`` and ``eval``.

A command adds the flags with :func:`add_watch_flags`, then wraps its loop in
:class:`Watchers`, which starts the monitor and the recorder the flags ask for
and hands their listeners to the loop::

    with Watchers(args, metadata={"policy": ..., "server": url}) as watchers:
        executor = Executor(..., listeners=watchers.listeners)
        watchers.attach(executor)        # the monitor's buttons now act on it
        executor.run()

When the loop's environment (``executor.env``) is a replayed episode, the
monitor also shows the recorded actions next to the served ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..monitor import DEFAULT_PORT, Monitor
from ..record import SessionRecorder
from ..runtime.events import LoopControl, LoopListener

__all__ = ["add_watch_flags", "Watchers", "client_settings"]

#: Flags never written into a recording (secrets, callables).
_PRIVATE_FLAGS = {"api_key", "func"}


def add_watch_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("watch and record")
    group.add_argument(
        "--monitor", nargs="?", type=int, const=DEFAULT_PORT, default=None, metavar="PORT",
        help=f"serve a live monitor page (cameras, plots, latency, start/stop/reset buttons) on PORT (default: {DEFAULT_PORT}); "
             "the buttons answer that page only (a per-session token and an Origin check refuse other web pages and scripts without the token)",
    )
    group.add_argument("--monitor-host", default="127.0.0.1", help="address the monitor listens on (default: 127.0.0.1, this machine only; "
                                                                   "with 0.0.0.0 anyone who can load the page can press its buttons)")
    group.add_argument(
        "--monitor-allow-host", action="append", default=[], metavar="NAME",
        help="a host name the monitor is reached by besides IP addresses, localhost and this machine's name (e.g. behind a proxy); repeatable",
    )
    group.add_argument("--record", type=Path, default=None, metavar="DIR", help="record the session (metadata, per-step log, camera JPEGs) into a new folder under DIR")


def client_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command's flags as JSON-able settings for ``metadata.json`` (no secrets)."""
    settings: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in _PRIVATE_FLAGS:
            continue
        if isinstance(value, Path):
            value = str(value)
        if value is None or isinstance(value, (str, int, float, bool)):
            settings[key] = value
    return settings


def _monitor_info(metadata: dict[str, Any]) -> dict[str, Any]:
    """The short facts shown under the page's title."""
    info = {key: value for key, value in metadata.items() if isinstance(value, (str, int, float))}
    policy = metadata.get("policy")
    if isinstance(policy, dict) and policy.get("model_id"):
        info = {"policy": policy["model_id"], **info}
    return info


class Watchers:
    """The monitor and the recorder asked for by ``--monitor`` / ``--record``."""

    def __init__(self, args: argparse.Namespace, metadata: dict[str, Any] | None = None, control: LoopControl | None = None, fps: float | None = None) -> None:
        self.monitor: Monitor | None = None
        self.recorder: SessionRecorder | None = None
        port = getattr(args, "monitor", None)
        if port is not None:
            info = _monitor_info(metadata or {})
            self.monitor = Monitor(control=control, host=getattr(args, "monitor_host", "127.0.0.1"), port=port, fps=fps, info=info,
                                   allowed_hosts=getattr(args, "monitor_allow_host", None) or ())
        record = getattr(args, "record", None)
        if record is not None:
            self.recorder = SessionRecorder(record, metadata)

    @property
    def listeners(self) -> list[LoopListener]:
        return [watcher for watcher in (self.monitor, self.recorder) if watcher is not None]

    def attach(self, control: LoopControl) -> None:
        """Let the monitor's buttons act on ``control`` (a loop built after the watchers).

        When the loop's environment (``control.env``) is a replayed episode
        (it has a ``last_recorded_action``), the page also shows the recorded
        actions and how far the served ones are from them.
        """
        if self.monitor is not None:
            self.monitor.control = control
            self.monitor.config["controls"] = True
            env = getattr(control, "env", None)
            if env is not None and hasattr(env, "last_recorded_action"):
                self.monitor.show_replay(env)

    def __enter__(self) -> Watchers:
        if self.monitor is not None:
            self.monitor.start()
            print(f"policylink: monitor on {self.monitor.url}", flush=True)
        if self.recorder is not None:
            print(f"policylink: recording to {self.recorder.path}", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.recorder is not None:
            self.recorder.close()
            print(f"policylink: recorded {self.recorder.stats.summary()} in {self.recorder.path}", flush=True)
        if self.monitor is not None:
            self.monitor.close()
