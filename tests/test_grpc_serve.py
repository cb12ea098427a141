"""One ``policylink serve`` process answers WebSocket, gRPC and TCP clients at once, with the same model."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("lerobot")

from conftest import POLICYLINK, free_port, wait_healthy  # noqa: E402
from lerobot_checkpoints import act_dir  # noqa: E402,F401

from policylink.client import PolicyClient  # noqa: E402
from policylink.client.tcp import TcpClient  # noqa: E402

def test_one_process_serves_three_protocols_with_one_model(act_dir):
    ws_port, grpc_port, tcp_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--grpc-port", str(grpc_port),
         "--tcp-port", str(tcp_port), "--policy.path", str(act_dir), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_healthy(ws_port, process)
        rng = np.random.default_rng(0)
        obs = {"observation.state": rng.normal(size=6).astype(np.float32), "observation.images.front": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)}
        with PolicyClient(f"ws://127.0.0.1:{ws_port}", timeout=60) as ws, PolicyClient(f"grpc://127.0.0.1:{grpc_port}", timeout=60) as rpc, \
                TcpClient("127.0.0.1", tcp_port, timeout=60) as tcp:
            assert ws.metadata == rpc.metadata
            assert tcp.metadata["model_id"] == ws.metadata.model_id
            by_ws, by_grpc, by_tcp = np.asarray(ws.infer(obs)), np.asarray(rpc.infer(obs)), tcp.request(obs)["actions"]
            with urllib.request.urlopen(f"http://127.0.0.1:{ws_port}/healthz", timeout=5) as response:
                health = json.loads(response.read())
        assert by_ws.shape == (16, 6)
        np.testing.assert_allclose(by_grpc, by_ws, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(by_tcp, by_ws, rtol=1e-5, atol=1e-5)
        assert health["clients"] == 3  # all three connected to the one engine at once
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    log = process.stdout.read()
    assert f"grpc://127.0.0.1:{grpc_port}" in log and f"tcp://127.0.0.1:{tcp_port} (msgpack)" in log


def test_lerobot_compat_needs_trust_pickle():
    out = subprocess.run([*POLICYLINK, "serve", "--lerobot-compat-port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--lerobot-compat-port needs --trust-pickle" in out.stderr


def test_lerobot_compat_warns_and_binds_localhost():
    ws_port, compat_port = free_port(), free_port()
    process = subprocess.Popen(
        [*POLICYLINK, "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--lerobot-compat-port", str(compat_port), "--trust-pickle"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_healthy(ws_port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    log = process.stdout.read()
    assert "WARNING: --trust-pickle" in log and "can run code on this server" in log
    assert f"LeRobot async inference on 127.0.0.1:{compat_port}" in log
