"""``policylink status URL``: the real command against real servers on 127.0.0.1.

Servers come from conftest's ``serve`` fixture (a real WebSocket server with
a real policy); the command runs as its own process. The ``serve --ray``
front door is the real :class:`FrontDoor` in front of two real servers; only
Ray's replica directory is replaced by a fixed view of them (Ray itself is
tested in test_rayserve.py and takes minutes to start).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import POLICYLINK, EchoPolicy, free_port, self_signed_cert
from policylink import PolicyClient
from policylink import cli
from policylink.cli.status import histogram_quantile, http_base_url, parse_prometheus
from policylink.errors import ServerError

STATE = {"observation.state": np.zeros(6, np.float32)}

#: The command under test. Until ``status`` is listed in ``cli.COMMANDS``, the same ``cli.main`` with the module added.
STATUS = [*POLICYLINK, "status"] if "status" in cli.COMMANDS else [
    sys.executable, "-c", "import sys; from policylink import cli; cli.COMMANDS += ('status',); sys.exit(cli.main())", "status",
]


def status(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess:
    """Run ``policylink status ARGS``; ``api_key`` goes in ``$POLICYLINK_API_KEY`` (never inherited from the test's environment)."""
    env = {name: value for name, value in os.environ.items() if name != "POLICYLINK_API_KEY"}
    if api_key is not None:
        env["POLICYLINK_API_KEY"] = api_key
    return subprocess.run([*STATUS, *args], capture_output=True, text=True, env=env, timeout=60)


def traffic(client: PolicyClient, infers: int, failures: int = 0) -> PolicyClient:
    """``infers`` answered requests and ``failures`` failing ones from ``client`` (returned, still connected)."""
    for tag in range(infers):
        client.infer({**STATE, "tag": tag})
    for _ in range(failures):
        with pytest.raises(ServerError, match="asked to fail"):
            client.infer({**STATE, "fail": "on purpose"})
    return client


# -- the quantile estimate and the text format ---------------------------------------


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    # 100 observations: 10 up to 10 ms, 20 in (10, 20], 60 in (20, 50], 10 in (50, 100].
    histogram = [(0.01, 10.0), (0.02, 30.0), (0.05, 90.0), (0.1, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, histogram) == pytest.approx(0.02 + 0.03 * 20 / 60)  # rank 50: 20 of the bucket's 60
    assert histogram_quantile(0.9, histogram) == pytest.approx(0.05)  # rank 90: the top of its bucket
    assert histogram_quantile(0.99, histogram) == pytest.approx(0.05 + 0.05 * 9 / 10)
    assert histogram_quantile(0.05, histogram) == pytest.approx(0.005)  # the lowest bucket starts at 0
    assert histogram_quantile(0.5, list(reversed(histogram))) == histogram_quantile(0.5, histogram)  # order does not matter


def test_quantile_edge_cases() -> None:
    # A rank past the highest finite bound: that bound is all that is known.
    assert histogram_quantile(0.99, [(0.01, 1.0), (0.1, 2.0), (math.inf, 10.0)]) == pytest.approx(0.1)
    assert histogram_quantile(0.5, [(0.01, 0.0), (math.inf, 0.0)]) is None  # nothing observed
    assert histogram_quantile(0.5, [(0.01, 3.0), (0.1, 3.0)]) is None  # no +Inf bucket: not a whole histogram
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram_quantile(1.5, [(math.inf, 1.0)])


def test_parse_prometheus_reads_labels_escapes_and_special_values() -> None:
    text = (
        "# HELP policylink_requests_total Requests answered\n"
        "# TYPE policylink_requests_total counter\n"
        'policylink_requests_total{protocol="websocket",kind="infer"} 6.0\n'
        'policylink_errors_total{reason="bad_request",note="say \\"hi\\"\\\\n, {x}"} 2 1712345678000\n'
        'policylink_request_seconds_bucket{le="+Inf"} 7.0\n'
        "policylink_connected_clients 2.0\n"
        "garbage line\n"
    )
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parse_prometheus(text)}
    assert samples[("policylink_requests_total", (("kind", "infer"), ("protocol", "websocket")))] == 6
    assert samples[("policylink_errors_total", (("note", 'say "hi"\\n, {x}'), ("reason", "bad_request")))] == 2
    assert samples[("policylink_request_seconds_bucket", (("le", "+Inf"),))] == 7
    assert samples[("policylink_connected_clients", ())] == 2
    assert len(samples) == 4


def test_urls_map_to_the_websocket_port_pages() -> None:
    assert http_base_url("ws://gpu-box:8000") == "http://gpu-box:8000"
    assert http_base_url("wss://gpu-box:8443/?model=x") == "https://gpu-box:8443"
    assert http_base_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="WebSocket port"):
        http_base_url("grpc://gpu-box:50051")


# -- the command against real servers -------------------------------------------------


def test_status_shows_model_requests_errors_and_percentiles(serve: Any) -> None:
    server = serve(EchoPolicy())
    with traffic(PolicyClient(server.url), infers=5, failures=1):  # still connected while the command looks
        result = status(server.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"policylink server at {server.url}" in out
    assert "NOT READY" not in out
    assert "models       test/echo" in out
    assert "clients      1" in out
    assert "requests     5 (infer 5)" in out
    assert "errors       1 (internal 1)" in out
    header = next(line for line in out.splitlines() if "p50" in line)
    assert header.split() == ["p50", "p90", "p99", "count"]
    request_row = next(line for line in out.splitlines() if line.split()[:1] == ["request"])
    assert request_row.split()[-1] == "5"
    p50, p90, p99 = (float(cell) for cell in request_row.split()[1:4])
    assert 0 < p50 <= p90 <= p99


def test_json_output_parses_and_holds_the_numbers(serve: Any) -> None:
    server = serve(EchoPolicy())
    with traffic(PolicyClient(server.url), infers=3):
        result = status(server.url, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "server" and data["health"]["ready"] is True
    assert data["health"]["models"] == ["test/echo"]
    metrics = data["metrics"]
    assert metrics["error"] is None
    assert metrics["requests"] == 3 and metrics["requests_by_kind"] == {"infer": 3}
    assert metrics["errors"] == 0 and metrics["errors_by_kind"] == {}
    request = metrics["latency_ms"]["request"]
    assert request["count"] == 3
    assert 0 < request["p50"] <= request["p90"] <= request["p99"]


def test_a_locked_server_shows_everything_to_the_key(serve: Any, tmp_path: Path) -> None:
    server = serve(EchoPolicy(), api_key="sesame")
    with traffic(PolicyClient(server.url, api_key="sesame"), infers=2):
        result = status(server.url, api_key="sesame")  # from $POLICYLINK_API_KEY
    assert result.returncode == 0, result.stderr
    assert "test/echo" in result.stdout and "requests     2 (infer 2)" in result.stdout
    key_file = tmp_path / "key"
    key_file.write_text("sesame\n")
    data = json.loads(status(server.url, "--json", "--api-key-file", str(key_file)).stdout)
    assert data["metrics"]["requests"] == 2 and data["health"]["models"] == ["test/echo"]


def test_without_the_key_metrics_are_refused_but_health_is_shown(serve: Any) -> None:
    """Exit status 0: the server answered and is ready; the output says what the key would add."""
    server = serve(EchoPolicy(), api_key="sesame")
    with traffic(PolicyClient(server.url, api_key="sesame"), infers=1):
        result = status(server.url)
    assert result.returncode == 0, result.stderr
    assert "ready    yes" in result.stdout
    assert "refused: the server needs an API key (give --api-key-file PATH or set $POLICYLINK_API_KEY)" in result.stdout
    assert "test/echo" not in result.stdout  # model ids are details for key holders only
    wrong = status(server.url, api_key="open says me")
    assert wrong.returncode == 0 and "refused: the API key is wrong" in wrong.stdout


def test_an_idle_server_is_reported_not_ready(serve: Any) -> None:
    server = serve(None)
    result = status(server.url)
    assert result.returncode == 0, result.stderr
    assert "NOT READY" in result.stdout and "ready        NO" in result.stdout
    assert json.loads(status(server.url, "--json").stdout)["health"]["ready"] is False


def test_an_unreachable_server_is_one_line_and_exit_1() -> None:
    url = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    result = status(url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"policylink status: error: cannot reach {url} (http://{url[5:]}/healthz): connection refused (is the server running on that port?)"
    ]


def test_wss_needs_the_ca_file(serve: Any, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server = serve(EchoPolicy(), tls_cert=cert, tls_key=key)
    url = f"wss://127.0.0.1:{server.port}"
    trusted = status(url, "--ca-file", str(cert))
    assert trusted.returncode == 0, trusted.stderr
    assert "test/echo" in trusted.stdout
    untrusted = status(url)
    assert untrusted.returncode == 1
    assert f"cannot reach {url}" in untrusted.stderr and "pass --ca-file" in untrusted.stderr


# -- a serve --ray front door -----------------------------------------------------------


@dataclass
class Door:
    """A front door on its own event loop, and the servers it stands for."""

    door: Any
    replicas: list[Any]
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.door.port}"

    def refresh(self) -> None:
        """Read the replicas' health now, as the door does every second from Ray's directory."""
        asyncio.run_coroutine_threadsafe(self.door.refresh(), self.loop).result(30)


@pytest.fixture
def front_door(serve: Any) -> Iterator[Door]:
    """The real front door in front of two real servers (Ray's directory replaced by a view of them)."""
    pytest.importorskip("ray", reason="the front door module comes with the [ray] extra")
    pytest.importorskip("prometheus_client", reason="the front door merges its replicas' metrics with it")
    from policylink.rayserve.frontdoor import FrontDoor

    replicas = [serve(EchoPolicy(), api_key="sesame"), serve(EchoPolicy(), api_key="sesame")]

    async def view() -> dict[str, dict[str, Any]]:
        return {f"r{i}": {"replica": f"r{i}", "host": "127.0.0.1", "port": server.port, **server.ws.health()} for i, server in enumerate(replicas)}

    async def no_sessions(peer: str, model: str) -> Any:
        raise RuntimeError("this test sends no clients through the door")

    loop = asyncio.new_event_loop()
    door = FrontDoor(no_sessions, view, "127.0.0.1", 0, api_key="sesame")
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(door.start(), loop).result(30)
    try:
        yield Door(door, replicas, loop)
    finally:
        asyncio.run_coroutine_threadsafe(door.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_a_front_door_gets_one_row_per_replica(front_door: Door) -> None:
    replicas, url = front_door.replicas, front_door.url
    with traffic(PolicyClient(replicas[0].url, api_key="sesame"), infers=3), traffic(PolicyClient(replicas[1].url, api_key="sesame"), infers=1, failures=1):
        front_door.refresh()
        result = status(url, api_key="sesame")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"policylink front door at {url}" in out
    assert "replicas  2" in out and "requests  4 (infer 4)" in out and "errors    1 (internal 1)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[out.splitlines().index("replicas") + 2:]}
    assert rows["r0"][1:7] == [f"127.0.0.1:{replicas[0].port}", "yes", "1", "test/echo", "3", "0"]
    assert rows["r1"][1:7] == [f"127.0.0.1:{replicas[1].port}", "yes", "1", "test/echo", "1", "1"]
    data = json.loads(status(url, "--json", api_key="sesame").stdout)
    assert [row["metrics"]["requests"] for row in data["replicas"]] == [3, 1]
    assert data["metrics"]["latency_ms"]["request"]["count"] == 4
