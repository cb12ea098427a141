"""Stalled and excess connections are closed or refused clearly; running out of file descriptors stays quiet."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from conftest import POLICYLINK, EchoPolicy, free_port, wait_healthy
from protocol_servers import read_frame, running

from policylink import PolicyClient
from policylink.client.tcp import TcpClient
from policylink.errors import ServerBusy
from policylink.server.engine import Engine
from policylink.server.tcp import TcpServer
from policylink.server.websocket import WebSocketServer


@pytest.fixture
def tcp():
    engine = Engine(EchoPolicy())
    server = TcpServer(engine, "127.0.0.1", 0, read_timeout_s=0.5, idle_timeout_s=1.0)
    with running(engine, [server]):
        yield server


def test_half_frame_is_closed_after_the_read_timeout(tcp):
    with socket.create_connection(("127.0.0.1", tcp.port), timeout=10) as stalled, TcpClient("127.0.0.1", tcp.port) as good:
        read_frame(stalled)  # metadata
        stalled.sendall(struct.pack(">I", 100) + b"x" * 10)  # ten of a hundred bytes, then nothing
        started = time.monotonic()
        assert good.request({"tag": 1.0})["actions"][0, 0] == 1.0  # others are served meanwhile
        error = read_frame(stalled)
        assert error == {"error": "connection silent for 0.5 s inside the frame's 100 bytes (10 of 100 bytes received): closed", "kind": "bad_request"}
        assert stalled.recv(1) == b""
        assert 0.4 < time.monotonic() - started < 5


def test_silent_connection_is_closed_after_the_idle_timeout(tcp):
    with socket.create_connection(("127.0.0.1", tcp.port), timeout=10) as silent:
        read_frame(silent)
        started = time.monotonic()
        assert read_frame(silent) == {"error": "connection idle for 1 s without a request: closed", "kind": "bad_request"}
        assert silent.recv(1) == b""
        assert 0.9 < time.monotonic() - started < 5


def test_connections_over_the_limit_are_refused_clearly_and_the_rest_keep_working():
    engine = Engine(EchoPolicy(), max_connections=3)
    ws, tcp = WebSocketServer(engine, "127.0.0.1", 0), TcpServer(engine, "127.0.0.1", 0)
    with running(engine, [ws, tcp]):
        first, second = TcpClient("127.0.0.1", tcp.port), TcpClient("127.0.0.1", tcp.port)
        third = PolicyClient(f"ws://127.0.0.1:{ws.port}")
        with socket.create_connection(("127.0.0.1", tcp.port), timeout=10) as extra:
            refusal = read_frame(extra)
            assert refusal == {"error": "server busy: too many connections (3 open, the server's limit); retry later", "kind": "busy"}
            assert extra.recv(1) == b""
        with pytest.raises(ServerBusy, match="too many connections"):
            PolicyClient(f"ws://127.0.0.1:{ws.port}", connect_timeout=5)
        assert first.request({"tag": 1.0})["actions"][0, 0] == 1.0
        assert third.infer({"tag": 3.0})[0, 0] == 3.0
        second.close()
        deadline = time.monotonic() + 10
        while engine.connections.open > 2:
            assert time.monotonic() < deadline, "the closed connection was never counted out"
            time.sleep(0.01)
        with TcpClient("127.0.0.1", tcp.port) as fourth:  # room again
            assert fourth.request({"tag": 4.0})["actions"][0, 0] == 4.0
        first.close()
        third.close()


def test_running_out_of_file_descriptors_neither_locks_out_nor_floods_the_log():
    port, tcp_port = free_port(), free_port()
    command = " ".join([*POLICYLINK, "serve", "--policy.type", "zeros", "--host", "127.0.0.1", "--port", str(port), "--tcp-port", str(tcp_port)])
    process = subprocess.Popen(["bash", "-c", f"ulimit -n 400 && exec {command}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sockets = []
    try:
        wait_healthy(port, process)
        for _ in range(500):  # more than the process has descriptors for, never sending a byte
            sockets.append(socket.create_connection(("127.0.0.1", tcp_port), timeout=10))
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
        assert time.monotonic() - started < 5
        for sock in sockets[:10]:
            sock.close()
        deadline = time.monotonic() + 10
        while True:  # room again once the server has seen a few of them leave
            try:
                client = PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=10)
                break
            except ServerBusy:
                assert time.monotonic() < deadline, "no room after ten connections closed"
                time.sleep(0.05)
        with client:
            assert client.infer({"observation.state": np.zeros(6, np.float32)}).shape == (16, 6)
    finally:
        for sock in sockets:
            sock.close()
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Too many open files" not in output
    assert "file descriptors: limiting connections to" in output
    # 500 connections: without rate limiting each logs at least one line; with it, a burst per message, then a summary.
    connection_lines = [line for line in output.splitlines() if "connect" in line or "refused" in line]
    assert len(connection_lines) < 120, f"{len(connection_lines)} log lines about connections"


def test_repeated_log_lines_are_rate_limited_with_a_count_of_what_was_dropped():
    import logging

    from policylink.server.connections import RateLimitedLog

    limiter, passed = RateLimitedLog(burst=3, interval_s=0.2), []
    record = lambda message: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)  # noqa: E731
    for _ in range(1000):
        if limiter.filter(entry := record("socket.accept() out of system resource")):
            passed.append(entry.getMessage())
    assert limiter.filter(record("another message"))  # other messages are not silenced
    assert len(passed) == 3
    time.sleep(0.25)  # the limiter's own interval, not a wait for another thread
    entry = record("socket.accept() out of system resource")
    assert limiter.filter(entry)
    assert entry.getMessage() == "socket.accept() out of system resource (997 similar messages suppressed in the last 0.2 s)"
