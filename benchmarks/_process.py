"""Start a server as a separate process (so client and server don't share a GIL) and stop it after."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICYLINK = [sys.executable, "-m", "policylink"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def policylink_server(*flags: str, timeout: float = 120.0) -> Iterator[int]:
    """``policylink serve`` on 127.0.0.1 (free port) until the block ends; yields the port."""
    with policylink_process(*flags, timeout=timeout) as (port, _process):
        yield port


@contextlib.contextmanager
def policylink_process(*flags: str, timeout: float = 120.0) -> Iterator[tuple[int, subprocess.Popen]]:
    """Like :func:`policylink_server`, yielding ``(port, process)`` (to read the server's memory, say)."""
    port = free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--host", "127.0.0.1", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"policylink serve {' '.join(flags)} exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    if json.loads(response.read()).get("status") == "ok":
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield port, process
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def baseline_server(kind: str, reply_size: int = 0, policy_path: str = "", device: str = "cpu") -> Iterator[int]:
    """A server from ``_baselines.py`` in its own process; yields the port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_baselines.py"), kind, str(port), str(reply_size), policy_path, device],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        # Libraries may print while loading (lerobot does); wait for our own line.
        for line in process.stdout:
            if line.startswith("ready"):
                break
        else:
            raise RuntimeError(f"baseline {kind} did not start (exit code {process.wait()})")
        yield port
    finally:
        process.terminate()
        process.wait(30)
