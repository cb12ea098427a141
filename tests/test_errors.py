"""One request path: every protocol reports the same error kinds, timings and metrics."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
from conftest import EchoPolicy, GatedPolicy
from protocol_servers import running

from policylink import PolicyClient
from policylink.client.tcp import TcpClient
from policylink.errors import ModelNotLoaded, RequestError, RequestTooLarge, ServerBusy, ServerError
from policylink.server.engine import BatchOptions, Engine
from policylink.server.tcp import TcpServer
from policylink.server.websocket import WebSocketServer

grpc = pytest.importorskip("grpc")
prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from policylink.server.grpc_server import GrpcServer  # noqa: E402

PROTOCOLS = ["ws", "grpc", "tcp"]


@pytest.fixture
def servers():
    """One engine behind WebSocket, gRPC and TCP; yields ``(engine, {protocol: port})``."""
    started = []

    def start(engine: Engine, **ws_options):
        ws, rpc, tcp = WebSocketServer(engine, "127.0.0.1", 0, **ws_options), GrpcServer(engine, "127.0.0.1", 0), TcpServer(engine, "127.0.0.1", 0)
        context = running(engine, [ws, rpc, tcp])
        context.__enter__()
        started.append(context)
        return {"ws": ws.port, "grpc": rpc.port, "tcp": tcp.port}

    yield start
    for context in started:
        context.__exit__(None, None, None)


def request(protocol: str, port: int, message: dict, **options):
    """One request over ``protocol`` with policylink's own client for it."""
    if protocol == "tcp":
        with TcpClient("127.0.0.1", port, timeout=10) as client:
            if "__command__" in message:
                return client.request(message)
            return client.request(message)["actions"]
    with PolicyClient(f"{protocol}://127.0.0.1:{port}", timeout=10, **options) as client:
        if message.get("__command__") == "configure":
            return client.configure(message["policy_path"])
        return np.asarray(client.infer(message))


def test_a_full_queue_is_server_busy_on_every_protocol(servers):
    policy = GatedPolicy()
    engine = Engine(policy, batching=BatchOptions(max_batch=1, max_queue=1))
    ports = servers(engine)
    holder = threading.Thread(target=request, args=("ws", ports["ws"], {"tag": 1.0, "hold": 1}))
    holder.start()
    try:
        policy.wait_started(1)
        for protocol in PROTOCOLS:
            with pytest.raises(ServerBusy, match="server busy: 1 requests already queued"):
                request(protocol, ports[protocol], {"tag": 2.0})
    finally:
        policy.gate.set()
        holder.join(30)


def test_no_model_is_model_not_loaded_on_every_protocol(servers):
    ports = servers(Engine(None))
    for protocol in PROTOCOLS:
        with pytest.raises(ModelNotLoaded, match="send a configure request first"):
            request(protocol, ports[protocol], {"observation.state": np.zeros(6, np.float32)})


def test_the_kind_decides_the_exception_never_the_message_text(servers):
    """A refusal whose text happens to start with 'server busy' is still a bad request."""

    def loader(request):
        raise RequestError("server busy: is not a checkpoint name, it is a bad request")

    ports = servers(Engine(None, loader=loader))
    for protocol in PROTOCOLS:
        with pytest.raises(RequestError) as info:
            request(protocol, ports[protocol], {"__command__": "configure", "policy_path": "x"})
        assert not isinstance(info.value, ServerBusy)


def test_a_failing_policy_is_a_server_error_on_every_protocol(servers):
    ports = servers(Engine(EchoPolicy()))
    for protocol in PROTOCOLS:
        with pytest.raises(ServerError, match="inference failed: ValueError: test policy asked to fail: boom") as info:
            request(protocol, ports[protocol], {"fail": "boom"})
        assert type(info.value) is ServerError


def test_decode_time_is_reported_on_every_protocol(servers):
    ports = servers(Engine(EchoPolicy()))
    obs = {"tag": 1.0, "observation.images.front": np.zeros((480, 640, 3), np.uint8)}
    with TcpClient("127.0.0.1", ports["tcp"]) as tcp:
        timings = [tcp.request(obs)["server_timing"]]
    for protocol in ("ws", "grpc"):
        with PolicyClient(f"{protocol}://127.0.0.1:{ports[protocol]}") as client:
            timings.append(client.infer(obs).server_timing)
    for timing in timings:
        assert timing["decode_ms"] > 0 and {"queue_ms", "infer_ms", "batch_size"} <= set(timing)


def test_prometheus_counts_every_protocol(servers):
    ports = servers(Engine(EchoPolicy()))
    for protocol in PROTOCOLS:
        request(protocol, ports[protocol], {"tag": 1.0})
        with pytest.raises(ServerError):
            request(protocol, ports[protocol], {"fail": "x"})
    with pytest.raises(RequestError):
        request("tcp", ports["tcp"], {"__command__": "explode"})
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['ws']}/metrics", timeout=10) as response:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(response.read().decode()) for s in f.samples}
    for protocol in ("websocket", "grpc", "tcp"):
        assert samples[("policylink_requests_total", (("kind", "infer"), ("protocol", protocol)))] == 1
        assert samples[("policylink_errors_total", (("protocol", protocol), ("reason", "internal")))] == 1
    assert samples[("policylink_errors_total", (("protocol", "tcp"), ("reason", "bad_request")))] == 1
    assert samples[("policylink_inference_seconds_count", ())] == 3


def test_an_oversized_grpc_request_is_too_large_not_busy(servers):
    engine = Engine(EchoPolicy())
    server = GrpcServer(engine, "127.0.0.1", 0, max_message_bytes=1 << 20)
    with running(engine, [server]):
        with PolicyClient(f"grpc://127.0.0.1:{server.port}", max_message_bytes=8 << 20) as client:
            with pytest.raises(RequestTooLarge, match="the server accepts at most 1048576") as info:
                client.infer({"img": np.zeros(2 << 20, np.uint8)})
            assert not isinstance(info.value, ServerBusy)
            assert client.infer({"tag": 3.0})[0, 0] == 3.0


def test_openpi_client_still_gets_plain_text_errors(servers):
    """Structured errors are only for clients that ask for them: openpi's sees the message itself."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    ports = servers(Engine(EchoPolicy()))
    client = WebsocketClientPolicy(host="127.0.0.1", port=ports["ws"])
    with pytest.raises(RuntimeError) as info:
        client.infer({"fail": "plain"})
    assert "inference failed: ValueError: test policy asked to fail: plain" in str(info.value)
    assert "{" not in str(info.value).split("Error in inference server:")[-1].strip()[:1]
