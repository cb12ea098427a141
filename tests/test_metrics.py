"""Server observability: Prometheus metrics and /healthz move with real traffic."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

import numpy as np
import pytest

from conftest import EchoPolicy, free_port
from policylink.client import PolicyClient
from policylink.errors import ServerError
from policylink.server.engine import Engine

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_real_requests(serve: Any) -> None:
    server = serve(EchoPolicy(action_dim=6))
    metrics_url = f"http://127.0.0.1:{server.port}/metrics"
    before = scrape(metrics_url)
    assert value(before, "policylink_requests_total", protocol="websocket", kind="infer") == 0
    assert value(before, "policylink_connected_clients") == 0
    assert value(before, "policylink_models_loaded") == 1 and value(before, "policylink_model_ready") == 1

    with PolicyClient(server.url) as first, PolicyClient(server.url) as second:
        for tag in range(5):
            first.infer({"observation.state": np.zeros(6, np.float32), "tag": tag})
        second.infer({"observation.state": np.zeros(6, np.float32), "sleep_s": 0.2})
        second.reset()
        with pytest.raises(ServerError, match="test policy asked to fail"):
            second.infer({"fail": "on purpose"})
        during = scrape(metrics_url)

    assert value(during, "policylink_connected_clients") == 2
    assert value(during, "policylink_requests_total", protocol="websocket", kind="infer") == 6
    assert value(during, "policylink_requests_total", protocol="websocket", kind="command") == 1
    assert value(during, "policylink_errors_total", protocol="websocket", reason="internal") == 1
    assert value(during, "policylink_inference_seconds_count") == 6
    assert value(during, "policylink_queue_seconds_count") == 6
    assert value(during, "policylink_request_seconds_count") == 6
    # The 0.2 s request lands above the 0.15 s bucket of the inference histogram.
    assert value(during, "policylink_inference_seconds_bucket", le="0.15") == 5
    assert value(during, "policylink_inference_seconds_sum") >= 0.2
    assert value(during, "policylink_request_seconds_sum") >= value(during, "policylink_inference_seconds_sum")

    # Clients gone: the gauge follows (the server notices the close asynchronously).
    deadline = time.monotonic() + 10
    while value(scrape(metrics_url), "policylink_connected_clients") != 0:
        assert time.monotonic() < deadline, "connected_clients did not drop to 0"
        time.sleep(0.05)


def test_bad_input_is_counted_and_server_keeps_serving(serve: Any) -> None:
    server = serve(EchoPolicy(action_dim=6), api_key=None)
    with PolicyClient(server.url) as client:
        with pytest.raises(ServerError, match="unknown command"):
            client._request({"__command__": "explode"}, None)
        client.infer({"observation.state": np.zeros(6, np.float32)})
    samples = scrape(f"http://127.0.0.1:{server.port}/metrics")
    assert value(samples, "policylink_errors_total", protocol="websocket", reason="bad_request") == 1
    assert value(samples, "policylink_requests_total", protocol="websocket", kind="infer") == 1


def test_healthz_says_whether_a_model_is_ready(serve: Any) -> None:
    idle = serve(Engine(None))
    with urllib.request.urlopen(f"http://127.0.0.1:{idle.port}/healthz") as response:
        health = json.load(response)
    assert health["ready"] is False and health["models"] == []
    assert value(scrape(f"http://127.0.0.1:{idle.port}/metrics"), "policylink_model_ready") == 0

    served = serve(EchoPolicy())
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz") as response:
        health = json.load(response)
    assert health["ready"] is True and health["models"] == ["test/echo"] and health["status"] == "ok"


def test_serve_metrics_port(tmp_path: Any) -> None:
    """``policylink serve --metrics-port`` serves the same numbers on a port of its own."""
    ws_port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "policylink", "serve", "--policy.type", "zeros", "--host", "127.0.0.1", "--port", str(ws_port), "--metrics-port", str(metrics_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with PolicyClient(f"ws://127.0.0.1:{ws_port}", connect_timeout=60) as client:
            for _ in range(3):
                client.infer({"observation.state": np.zeros(6, np.float32)})
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(samples, "policylink_requests_total", protocol="websocket", kind="infer") == 3
        assert value(samples, "policylink_models_loaded") == 1
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"Prometheus metrics on http://127.0.0.1:{metrics_port}/metrics" in output
