"""Operating a server: configuration (file < environment < flags), readiness, SIGTERM drain, quiet logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from policylink import PolicyClient
from policylink.errors import ServerBusy
from policylink.server.background import BackgroundServer
from policylink.server.engine import Engine

from conftest import POLICYLINK, EchoPolicy, free_port, wait_healthy, wait_until
from lerobot_checkpoints import act_dir  # noqa: F401

CLEAN_ENV = {name: value for name, value in os.environ.items() if not name.startswith("POLICYLINK_")}


def policylink(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*POLICYLINK, *args], capture_output=True, text=True, timeout=timeout, env={**CLEAN_ENV, **(env or {})})


def effective(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = policylink(*args, "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


# -- configuration -----------------------------------------------------------------


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(
        "policy:\n  type: constant\n  value: 0.25\n"  # nested keys read with dots
        "max-batch: 4\nbatch_timeout_ms: 5\nport: 9100\noverlap: false\nmodel-root: [/tmp]\n"
    )
    from_file = effective("serve", "--config", str(config))
    assert from_file["policy.type"] == "constant" and from_file["policy.value"] == 0.25
    assert (from_file["max-batch"], from_file["batch-timeout-ms"], from_file["ws-port"]) == (4, 5.0, 9100)
    assert from_file["overlap"] is False and from_file["model-root"] == ["/tmp"]

    env = {"POLICYLINK_MAX_BATCH": "6", "POLICYLINK_WS_PORT": "9200", "POLICYLINK_MODEL_ROOT": "/a,/b"}
    from_env = effective("serve", "--config", str(config), env=env)
    assert (from_env["max-batch"], from_env["ws-port"], from_env["model-root"]) == (6, 9200, ["/a", "/b"])
    assert from_env["policy.value"] == 0.25  # the file still counts where the environment says nothing

    from_flags = effective("serve", "--config", str(config), "--port", "9300", "--max-batch", "2", env=env)
    assert (from_flags["ws-port"], from_flags["max-batch"]) == (9300, 2)
    assert from_flags["model-root"] == ["/a", "/b"]


def test_run_and_eval_read_the_same_kind_of_file(tmp_path: Path) -> None:
    config = tmp_path / "lift_deploy.yaml"
    config.write_text("server: ws://127.0.0.1:8000\nepisodes: 20\nmode: sync\nimage-codec: jpeg\n")
    run = effective("run", "--config", str(config))
    assert (run["server"], run["episodes"], run["mode"], run["image-codec"]) == ("ws://127.0.0.1:8000", 20, "sync", "jpeg")
    assert effective("eval", "--config", str(config), "--episodes", "3")["episodes"] == 3


def test_print_config_masks_the_api_key(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("api-key: hunter2\n")
    result = policylink("serve", "--config", str(config), "--print-config")
    assert result.returncode == 0 and "hunter2" not in result.stdout and "api-key: '***'" in result.stdout


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("max-bach: 3\n", {}, "unknown key(s) 'max-bach'"),
        ("policy.type: nope\n", {}, "'policy.type' = 'nope' (from file"),
        ("max-batch: [1, 2]\n", {}, "'max-batch' = [1, 2]"),
        ("- a list\n", {}, "must be a mapping of flag names to values"),
        ("port: [unclosed\n", {}, "is not valid YAML"),
        ("", {"POLICYLINK_MAX_BATCH": "many"}, "'max-batch' = 'many' (from environment POLICYLINK_MAX_BATCH)"),
        ("", {"POLICYLINK_OVERLAP": "perhaps"}, "(from environment POLICYLINK_OVERLAP)"),
    ],
)
def test_bad_configuration_is_refused_with_its_key_value_and_source(tmp_path: Path, content: str, env: dict[str, str], message: str) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(content)
    result = policylink("serve", "--config", str(config), env=env, timeout=30)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    result = policylink("serve", "--config", str(tmp_path / "nowhere.yaml"))
    assert result.returncode == 1 and "cannot read config file" in result.stderr and "nowhere.yaml" in result.stderr


# -- readiness -------------------------------------------------------------------------


def _status(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_ready_only_once_the_model_is_loaded_and_clients_wait_for_it() -> None:
    engine = Engine(warming=True)
    with BackgroundServer(engine) as server:
        assert _status(server.port, "/healthz") == (200, {"status": "ok", "ready": False, "clients": 0, "in_flight": 0, "models_cached": 0,
                                                        "models_loaded": 0, "model_cache_hits": 0, "models_evicted": 0, "models": []})
        assert _status(server.port, "/readyz") == (503, {"ready": False, "state": "warming up"})
        connected: list[PolicyClient] = []
        client_thread = threading.Thread(target=lambda: connected.append(PolicyClient(server.url, connect_timeout=30)))
        client_thread.start()
        # The client's connection is open and waits for its metadata frame, which comes with the model.
        wait_until(lambda: engine.connections.open == 1, "the waiting client's connection")
        assert not connected and not engine.sessions
        engine.install(EchoPolicy())
        client_thread.join(30)
        assert connected and connected[0].metadata is not None and connected[0].metadata.model_id == "test/echo"
        assert connected[0].infer({"tag": 3.0})[0, 0] == 3.0
        assert _status(server.port, "/readyz") == (200, {"ready": True, "state": "ready"})
        connected[0].close()


def test_an_idle_server_is_ready_for_configure_requests(serve) -> None:
    server = serve(None)
    assert _status(server.port, "/readyz") == (200, {"ready": True, "state": "ready"})
    assert _status(server.port, "/healthz")[1]["ready"] is False  # no model served yet


# -- SIGTERM: drain -----------------------------------------------------------------------


def test_sigterm_finishes_the_running_request_then_exits(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--policy.type", "constant", "--policy.value", "0.5", "--policy.latency_ms", "1500",
         "--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CLEAN_ENV,
    )
    try:
        wait_healthy(port, process)
        client = PolicyClient(f"ws://127.0.0.1:{port}", timeout=30)
        replies: list[Any] = []
        worker = threading.Thread(target=lambda: replies.append(client.infer({"observation.state": np.zeros(6, np.float32)})))
        worker.start()
        wait_until(lambda: _status(port, "/healthz")[1].get("in_flight", 0) >= 1, "the slow request to start")
        process.send_signal(signal.SIGTERM)
        worker.join(30)
        assert replies and float(replies[0][0, 0]) == 0.5  # the running request was answered, not cut
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "shutting down: no new connections; 1 request(s) running" in output
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_draining_server_refuses_new_requests_with_a_named_error(serve) -> None:
    server = serve(EchoPolicy())
    with PolicyClient(server.url) as client:
        assert client.infer({"tag": 1.0})[0, 0] == 1.0
        server.engine.draining = True  # what SIGTERM sets, without stopping the test's server
        with pytest.raises(ServerBusy, match="shutting down"):
            client.infer({"tag": 2.0})
        assert _status(server.port, "/readyz") == (503, {"ready": False, "state": "draining"})
        server.engine.draining = False


# -- logs -------------------------------------------------------------------------------------


def test_info_logs_say_what_happened_per_client_not_per_request() -> None:
    port = free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--policy.type", "constant", "--host", "127.0.0.1", "--port", str(port), "--summary-every", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CLEAN_ENV,
    )
    try:
        wait_healthy(port, process)
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            for _ in range(5):
                client.infer({"observation.state": np.zeros(6, np.float32)})
        lines: list[str] = []
        assert process.stdout is not None
        watchdog = threading.Timer(60, process.kill)  # never hang the suite on a summary that does not come
        watchdog.start()
        for line in process.stdout:  # the summary comes on its own every half second
            lines.append(line)
            if "summary:" in line and "answered since start" in line and "5 answered" in line:
                break
        watchdog.cancel()
        process.send_signal(signal.SIGTERM)
        lines += process.communicate(timeout=30)[0].splitlines()
    finally:
        if process.poll() is None:
            process.kill()
    text = "\n".join(lines)
    assert "connected" in text and "disconnected after 5 requests (0 errors)" in text
    assert "request #" not in text  # per-request lines are debug
    assert "connection open" not in text and "websockets.server" not in text  # the library's lines are debug too
    assert process.returncode == 0


def test_json_logs_are_one_object_per_line() -> None:
    port = free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "--log-format", "json", "serve", "--policy.type", "constant", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLEAN_ENV,
    )
    try:
        wait_healthy(port, process)
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    records = [json.loads(line) for line in errors.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(record) for record in records)
    assert any(record["message"].startswith("shutting down") for record in records)


def test_preloaded_checkpoints_are_cached_before_the_server_is_ready(act_dir: Path) -> None:  # noqa: F811
    port = free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--preload", str(act_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CLEAN_ENV,
    )
    try:
        wait_healthy(port, process, timeout=180)
        wait_until(lambda: _status(port, "/readyz")[0] == 200, "the preload to finish", timeout=180)
        health = _status(port, "/healthz")[1]
        assert health["models_loaded"] == 1 and health["models"]
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            client.configure(str(act_dir), device="cpu")  # served from the cache: no second load
        health = _status(port, "/healthz")[1]
        assert health["models_loaded"] == 1 and health["model_cache_hits"] == 1
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
