"""Sessions that survive restarts and expiry; deadlines that bound every call; abandoned work that never runs."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
from conftest import EchoPolicy, GatedPolicy, free_port, wait_until
from protocol_servers import running

from policylink import ConnectionFailed, InferenceTimeout, PolicyClient
from policylink.codec import packb
from policylink.policies import ConstantPolicy
from policylink.server.background import BackgroundServer
from policylink.server.engine import BatchOptions, Engine
from policylink.server.tcp import TcpServer

grpc = pytest.importorskip("grpc")

from policylink.proto.v1 import policylink_pb2 as pb  # noqa: E402
from policylink.proto.v1 import policylink_pb2_grpc as pb_grpc  # noqa: E402
from policylink.server.grpc_server import GrpcServer  # noqa: E402

STATE = {"observation.state": np.zeros(6, np.float32)}


def constant_loader(request):
    """Loads 'checkpoints' named after the constant they answer with: ``ckpt/2.5`` answers 2.5."""
    return ConstantPolicy(value=float(str(request["policy_path"]).rsplit("/", 1)[-1]))


# -- configure survives reconnects ---------------------------------------------


def test_websocket_client_reconfigures_after_a_server_restart():
    port = free_port()
    first = BackgroundServer(Engine(None, loader=constant_loader), host="127.0.0.1", port=port).start()
    client = PolicyClient(f"ws://127.0.0.1:{port}", timeout=20, connect_timeout=20)
    try:
        client.configure("ckpt/2.5")
        assert client.infer(STATE)[0, 0] == 2.5
        first.stop()
        second = BackgroundServer(Engine(None, loader=constant_loader), host="127.0.0.1", port=port).start()
        try:
            # The new server is idle: the client re-sends its configure before the request.
            assert client.infer(STATE)[0, 0] == 2.5
            assert client.reconnects == 1
            assert second.engine.models.loads == 1
            assert client.metadata is not None and client.metadata.model_id == "builtin/constant"
        finally:
            second.stop()
    finally:
        client.close()


def test_grpc_client_reconfigures_after_a_server_restart():
    port = free_port()
    engine = Engine(None, loader=constant_loader)
    client = PolicyClient(f"grpc://127.0.0.1:{port}", timeout=20, connect_timeout=20, connect=False)
    try:
        with running(engine, [GrpcServer(engine, "127.0.0.1", port)]):
            client.configure("ckpt/1.5")
            assert client.infer(STATE)[0, 0] == 1.5
        engine = Engine(None, loader=constant_loader)
        with running(engine, [GrpcServer(engine, "127.0.0.1", port)]):
            assert client.infer(STATE)[0, 0] == 1.5
            assert client.reconnects == 1 and engine.models.loads == 1
    finally:
        client.close()


def test_grpc_session_expires_on_a_timer_and_the_client_reconfigures():
    engine = Engine(None, loader=constant_loader)
    server = GrpcServer(engine, "127.0.0.1", 0, session_idle_s=0.3)
    with running(engine, [server]):
        client = PolicyClient(f"grpc://127.0.0.1:{server.port}", timeout=20)
        try:
            client.configure("ckpt/3.5")
            assert client.infer(STATE)[0, 0] == 3.5
            # Nobody calls: the server's timer closes the idle session by itself.
            wait_until(lambda: not engine.sessions, "the idle session to expire")
            assert client.infer(STATE)[0, 0] == 3.5  # new session, configure re-sent
            assert client.reconnects == 1
            assert (engine.models.loads, engine.models.hits) == (1, 1)  # the model itself stayed cached
        finally:
            client.close()


def test_grpc_session_ids_are_unguessable_and_bound_to_their_connection():
    engine = Engine(EchoPolicy(), loader=constant_loader)
    server = GrpcServer(engine, "127.0.0.1", 0)
    with running(engine, [server]):
        target = f"127.0.0.1:{server.port}"
        robot = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        intruder = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            robot_stub, intruder_stub = pb_grpc.PolicyServiceStub(robot), pb_grpc.PolicyServiceStub(intruder)
            session_id = robot_stub.GetMetadata(pb.MetadataRequest(), timeout=10).session_id
            assert len(session_id) >= 32 and "127.0.0.1" not in session_id and "client-" not in session_id
            stolen = [("policylink-session", session_id)]
            for call, request in ((intruder_stub.Configure, pb.ConfigureRequest(policy_path="ckpt/9")), (intruder_stub.Close, pb.CloseRequest()),
                                  (intruder_stub.Infer, pb.Observation())):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, metadata=stolen, timeout=10)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # The robot's session is untouched: same model, still open.
            observation = pb.Observation()
            observation.fields["tag"].number = 4.0
            chunk = robot_stub.Infer(observation, metadata=stolen, timeout=10)
            assert np.frombuffer(chunk.actions.data, np.float32)[0] == 4.0
        finally:
            robot.close()
            intruder.close()


# -- every call is bounded by its timeout, outage included ---------------------------------


@pytest.mark.parametrize("scheme", ["ws", "grpc"])
def test_infer_timeout_bounds_a_call_during_an_outage(scheme):
    port = free_port()
    engine = Engine(EchoPolicy())
    servers = [GrpcServer(engine, "127.0.0.1", port)] if scheme == "grpc" else []
    background = None if servers else BackgroundServer(engine, host="127.0.0.1", port=port)
    url = f"{scheme}://127.0.0.1:{port}"
    if background is not None:
        background.start()
        client = PolicyClient(url, connect_timeout=60)
        client.infer({"tag": 1.0})
        background.stop()
    else:
        with running(engine, servers):
            client = PolicyClient(url, connect_timeout=60)
            client.infer({"tag": 1.0})
    try:
        started = time.monotonic()
        with pytest.raises((ConnectionFailed, InferenceTimeout)):
            client.infer({"tag": 2.0}, timeout=0.5)
        assert time.monotonic() - started < 2.0, "infer(timeout=0.5) must not wait for connect_timeout"
    finally:
        client.close()


# -- work for a client that gave up or left is dropped -------------------------------------


def _hold_the_model(url: str, policy: GatedPolicy) -> tuple[PolicyClient, threading.Thread]:
    holder = PolicyClient(url, timeout=30)
    thread = threading.Thread(target=holder.infer, args=({"tag": 1.0, "hold": 1},))
    thread.start()
    policy.wait_started(1)
    return holder, thread


@pytest.mark.parametrize("scheme", ["ws", "grpc"])
def test_requests_the_client_gave_up_on_never_run(serve, scheme):
    policy = GatedPolicy()
    engine = Engine(policy, batching=BatchOptions(max_batch=1))
    if scheme == "ws":
        url, stop = serve(engine).url, None
    else:
        server = GrpcServer(engine, "127.0.0.1", 0)
        stop = running(engine, [server])
        stop.__enter__()
        url = f"grpc://127.0.0.1:{server.port}"
    try:
        holder, thread = _hold_the_model(url, policy)
        with PolicyClient(url, timeout=0.3) as impatient:
            for tag in (2.0, 3.0, 4.0):  # each waits behind the held model, and is given up
                with pytest.raises(InferenceTimeout):
                    impatient.infer({"tag": tag})
            wait_until(lambda: engine.default_model.in_flight == 1, "the given-up requests to leave the queue")
            policy.gate.set()
            thread.join(30)
            assert impatient.infer({"tag": 5.0}, timeout=10)[0, 0] == 5.0
        holder.close()
        assert policy.seen == [1.0, 5.0], "a request whose client gave up was run anyway"
    finally:
        policy.gate.set()
        if stop is not None:
            stop.__exit__(None, None, None)


def test_tcp_request_of_a_client_that_left_never_runs():
    policy = GatedPolicy()
    engine = Engine(policy, batching=BatchOptions(max_batch=1))
    server = TcpServer(engine, "127.0.0.1", 0)
    with running(engine, [server]):
        from policylink.client.tcp import TcpClient

        holder = TcpClient("127.0.0.1", server.port, timeout=30)
        thread = threading.Thread(target=holder.request, args=({"tag": 1.0, "hold": 1},))
        thread.start()
        policy.wait_started(1)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as leaver:
            payload = packb({"tag": 2.0})
            leaver.sendall(struct.pack(">I", len(payload)) + payload)
            wait_until(lambda: engine.default_model.in_flight == 2, "the leaver's request to be queued")
        wait_until(lambda: engine.default_model.in_flight == 1, "the leaver's request to be dropped")
        policy.gate.set()
        thread.join(30)
        assert holder.request({"tag": 3.0})["actions"][0, 0] == 3.0
        holder.close()
    assert policy.seen == [1.0, 3.0]
