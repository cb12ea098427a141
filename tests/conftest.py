"""Shared fixtures: real servers on 127.0.0.1, real clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
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
    ``seen`` lists the tags of the calls that started; :meth:`wait_started`
    waits for a number of them (an event to wait on instead of a sleep).
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
        self.seen: list[float] = []
        self._started = threading.Condition()

    @property
    def metadata(self) -> PolicyMetadata:
        return self._metadata

    def wait_started(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` calls have started; fail after ``timeout`` s."""
        with self._started:
            if not self._started.wait_for(lambda: len(self.seen) >= count, timeout):
                raise AssertionError(f"only {len(self.seen)} of {count} calls started within {timeout} s")

    def infer(self, obs: Observation) -> Reply:
        with self._started:
            self.calls += 1
            self.seen.append(float(obs.get("tag", 0.0)))
            self._started.notify_all()
        if "fail" in obs:
            raise ValueError(f"test policy asked to fail: {obs['fail']}")
        time.sleep(float(obs.get("sleep_s", 0.0)))
        tag = float(obs.get("tag", 0.0))
        return {"actions": np.full((self.metadata.horizon, self.metadata.action_dim), tag, np.float32)}


class GatedPolicy(EchoPolicy):
    """One call at a time; a request with ``hold`` waits for :attr:`gate` (a model kept busy on demand)."""

    thread_safe = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def infer(self, obs: Observation) -> Reply:
        reply = super().infer(obs)
        if obs.get("hold"):
            assert self.gate.wait(30), "the test never opened the gate"
        return reply


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll server state that offers no event to wait on, up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def self_signed_cert(directory: Any) -> tuple[Any, Any]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key (PEM files in ``directory``)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


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


def run_concurrently(count: int, work: Callable[[int], Any]) -> list:
    """Call ``work(i)`` for ``i < count`` on threads released together; results (or the exceptions raised) in order."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # collected and checked by the test
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results
