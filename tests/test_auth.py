"""Every port locked: one API key on every protocol, quiet health checks, model roots, bounded echoes, TLS."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import POLICYLINK, EchoPolicy, free_port, self_signed_cert, wait_healthy
from protocol_servers import read_frame, running, send_frame

from policylink import PolicyClient
from policylink.client.tcp import TcpClient
from policylink.errors import CertificateError, ConnectionFailed, NotAllowed, RequestError, Unauthorized
from policylink.policies import ConstantPolicy
from policylink.server import auth
from policylink.server.engine import Engine
from policylink.server.tcp import TcpServer
from policylink.server.websocket import WebSocketServer

grpc = pytest.importorskip("grpc")

from policylink.server.grpc_server import GrpcServer  # noqa: E402

KEY = "correct horse battery staple"


# -- TCP --------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [{"tag": 1.0}, {"__command__": "configure", "policy_path": "/etc"}, {"__command__": "auth", "api_key": "wrong"}])
def test_tcp_port_serves_nobody_without_the_key(first):
    engine = Engine(EchoPolicy(), api_key=KEY, loader=lambda request: ConstantPolicy())
    server = TcpServer(engine, "127.0.0.1", 0)
    with running(engine, [server]):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            hello = read_frame(sock)
            assert hello["status"] == "auth_required" and "model_id" not in hello and "action_dim" not in hello
            send_frame(sock, first)
            assert read_frame(sock) == {"error": "missing or wrong API key: send {'__command__': 'auth', 'api_key': KEY} as the first frame", "kind": "unauthorized"}
            assert sock.recv(1) == b""  # and the connection is closed
        assert engine.default_model.policy.calls == 0 and engine.models.loads == 0
        with pytest.raises(Unauthorized, match="needs an API key"):
            TcpClient("127.0.0.1", server.port)
        with TcpClient("127.0.0.1", server.port, api_key=KEY) as client:
            assert client.metadata["model_id"] == "test/echo"
            assert client.request({"tag": 5.0})["actions"][0, 0] == 5.0


# -- LeRobot compat -----------------------------------------------------------------------


def test_lerobot_compat_port_needs_the_key():
    pytest.importorskip("lerobot")
    from lerobot.transport import services_pb2, services_pb2_grpc

    from policylink.server.lerobot_compat import LeRobotCompatServer

    engine = Engine(None, api_key=KEY)
    server = LeRobotCompatServer(engine, "127.0.0.1", 0)
    with running(engine, [server]):
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = services_pb2_grpc.AsyncInferenceStub(channel)
        for call, message in ((stub.Ready, services_pb2.Empty()), (stub.SendPolicyInstructions, services_pb2.PolicySetup(data=b"\x80\x04N."))):
            with pytest.raises(grpc.RpcError) as info:
                call(message, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert dict(info.value.trailing_metadata())["policylink-error-kind"] == "unauthorized"
        stub.Ready(services_pb2.Empty(), metadata=[("authorization", f"Bearer {KEY}")], timeout=10)
        channel.close()


# -- the key itself ---------------------------------------------------------------------------


def test_key_comparison_is_constant_time(monkeypatch):
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    key = auth.ApiKey(KEY)
    assert key.accepts(KEY) and not key.accepts(KEY[:-1]) and not key.accepts(None)
    assert key.accepts_header(f"Bearer {KEY}") and key.accepts_header(f"Api-Key {KEY}") and not key.accepts_header(KEY)
    assert len(compared) == 4


def test_key_sources(tmp_path, monkeypatch):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    assert auth.resolve_api_key(file=keyfile) == KEY
    assert auth.resolve_api_key(env={"POLICYLINK_API_KEY": KEY}) == KEY
    assert auth.resolve_api_key("flag", env={"POLICYLINK_API_KEY": KEY}) == "flag"  # the flag wins
    assert auth.resolve_api_key(env={}) is None
    with pytest.raises(ValueError, match="not both"):
        auth.resolve_api_key("a", file=keyfile)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        auth.resolve_api_key(file=tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read --api-key-file"):
        auth.resolve_api_key(file=tmp_path / "missing")


@pytest.mark.parametrize("source", ["file", "env"])
def test_serve_takes_the_key_from_a_file_or_the_environment(tmp_path, source):
    port, tcp_port = free_port(), free_port()
    command = [*POLICYLINK, "serve", "--policy.type", "zeros", "--host", "127.0.0.1", "--port", str(port), "--tcp-port", str(tcp_port)]
    env = dict(os.environ)
    if source == "file":
        (tmp_path / "key").write_text(KEY)
        command += ["--api-key-file", str(tmp_path / "key")]
    else:
        env["POLICYLINK_API_KEY"] = KEY
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_healthy(port, process)
        assert KEY not in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
        with pytest.raises(Unauthorized):
            PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=5)
        with PolicyClient(f"ws://127.0.0.1:{port}", api_key=KEY) as client:
            assert client.infer({"observation.state": np.zeros(6, np.float32)}).shape == (16, 6)
        with pytest.raises(Unauthorized):
            TcpClient("127.0.0.1", tcp_port)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "every port needs the API key" in output


# -- health and metrics -----------------------------------------------------------------------


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_healthz_and_metrics_tell_strangers_nothing(serve, tmp_path):
    secret_path = str(tmp_path / "secret-project" / "checkpoint")
    policy = EchoPolicy()
    policy._metadata = dataclasses.replace(policy.metadata, model_id=secret_path)
    server = serve(Engine(policy, api_key=KEY))
    status, body = _get(f"http://127.0.0.1:{server.port}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "ready": True}
    status, body = _get(f"http://127.0.0.1:{server.port}/healthz", KEY)
    assert json.loads(body)["models"] == [secret_path]
    assert _get(f"http://127.0.0.1:{server.port}/metrics")[0] == 401
    status, body = _get(f"http://127.0.0.1:{server.port}/metrics", KEY)
    assert status == 200 and b"policylink_requests_total" in body


def test_separate_metrics_port_needs_the_key_too():
    pytest.importorskip("prometheus_client")
    engine = Engine(EchoPolicy(), api_key=KEY)
    port = free_port()
    http_server = engine.metrics.serve(port, "127.0.0.1")
    try:
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 401
        assert _get(f"http://127.0.0.1:{port}/metrics", KEY)[0] == 200
    finally:
        http_server.shutdown()
        engine.close()


# -- what configure may load --------------------------------------------------------------------


def _value_loader(request):
    return ConstantPolicy(value=float(Path(request["policy_path"]).name))


def test_model_root_confines_configure_and_hides_what_exists_outside(serve, tmp_path):
    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    (root / "2.5").mkdir(parents=True)
    (outside / "3.5").mkdir(parents=True)
    (root / "escape").symlink_to(outside / "3.5")
    server = serve(Engine(None, loader=_value_loader, model_roots=[root]))
    with PolicyClient(server.url) as client:
        assert client.configure("2.5").model_id == "builtin/constant"  # relative: under the root
        assert client.infer({"observation.state": np.zeros(6, np.float32)})[0, 0] == 2.5
        client.configure(str(root / "2.5"))  # absolute, inside: fine
        refusals = []
        for path in (str(outside / "3.5"), str(tmp_path / "does-not-exist"), "/etc", "escape", "../elsewhere/3.5"):
            with pytest.raises(NotAllowed) as info:
                client.configure(path)
            refusals.append(str(info.value))
    # One message for all of them: an existing path and a missing one look the same.
    assert set(refusals) == {"policy path not allowed: this server loads checkpoints only from its --model-root folders"}
    assert server.engine.models.loads == 1


def test_echoed_input_is_bounded(serve):
    server = serve(Engine(None, loader=_value_loader))
    with PolicyClient(server.url) as client:
        with pytest.raises(RequestError) as info:
            client.configure("/x" * (4 << 20))  # an 8 MiB path: refused by the decoder's string limit
        assert len(str(info.value)) < 300 and "string of 8388608 bytes" in str(info.value)
        with pytest.raises(RequestError) as info:
            client.configure("/x" * (256 << 10))  # 512 KiB: decoded, refused by configure
        assert len(str(info.value)) < 300 and "524288 characters long (limit 4096)" in str(info.value)
        with pytest.raises(RequestError) as info:
            client._request({"__command__": "y" * (1 << 20)}, None)
        assert len(str(info.value)) < 300 and "more characters" in str(info.value)


# -- TLS ----------------------------------------------------------------------------------------


def test_websocket_tls_and_prompt_certificate_errors(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    engine = Engine(EchoPolicy(), api_key=KEY)
    ws, rpc = WebSocketServer(engine, "127.0.0.1", 0, tls_cert=cert, tls_key=key), GrpcServer(engine, "127.0.0.1", 0, tls_cert=cert, tls_key=key)
    with running(engine, [ws, rpc]):
        with PolicyClient(f"wss://127.0.0.1:{ws.port}", api_key=KEY, ca_file=str(cert)) as client:
            assert client.infer({"tag": 2.0})[0, 0] == 2.0
        for url in (f"wss://127.0.0.1:{ws.port}", f"grpcs://127.0.0.1:{rpc.port}"):
            started = time.monotonic()
            with pytest.raises(CertificateError, match="not trusted"):
                PolicyClient(url, api_key=KEY, connect_timeout=60)  # the system's roots do not know this CA
            assert time.monotonic() - started < 5, f"{url}: a certificate failure must be reported at once"
        with pytest.raises(ConnectionFailed):
            PolicyClient(f"ws://127.0.0.1:{ws.port}", api_key=KEY, connect_timeout=2)  # plaintext to a TLS port
