"""Shared fixtures: real servers on 127.0.0.1, real clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from policylink.server.background import BackgroundServer
from policylink.types import Feature, Observation, Policy, PolicyMetadata, Reply


class EchoPolicy(Policy):
    """A test policy: the chunk is filled with ``obs["tag"]``; sleeps ``obs["sleep_s"]``.

    Lets a test tell which request a reply answers, and make one request slow.
    """

    thread_safe = True

    def __init__(self, action_dim: int = 6, horizon: int = 16) -> None:
        self._metadata = PolicyMetadata(
            action_dim=action_dim,
            horizon=horizon,
            input_features={"observation.state": Feature((action_dim,))},
            model_id="test/echo",
            policy_type="echo",
        )
        self.calls = 0

    @property
    def metadata(self) -> PolicyMetadata:
        return self._metadata

    def infer(self, obs: Observation) -> Reply:
        self.calls += 1
        if "fail" in obs:
            raise ValueError(f"test policy asked to fail: {obs['fail']}")
        time.sleep(float(obs.get("sleep_s", 0.0)))
        tag = float(obs.get("tag", 0.0))
        return {"actions": np.full((self.metadata.horizon, self.metadata.action_dim), tag, np.float32)}


@pytest.fixture
def serve() -> Iterator[Callable[..., BackgroundServer]]:
    """Start a real WebSocket server on 127.0.0.1 (free port); stopped after the test."""
    servers: list[BackgroundServer] = []

    def start(policy: Any = None, **options: Any) -> BackgroundServer:
        server = BackgroundServer(policy, host="127.0.0.1", **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Runs the CLI of the package under test, as a real process.
POLICYLINK = [sys.executable, "-m", "policylink"]


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 90.0) -> dict:
    """Poll ``/healthz`` of a ``policylink serve`` process until it answers; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stdout.read() if process.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not come up")
