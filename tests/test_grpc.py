"""The typed gRPC protocol: real grpc.aio server on 127.0.0.1, real PolicyClient over grpc:// and grpcs://."""

from __future__ import annotations

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from conftest import EchoPolicy, self_signed_cert  # noqa: E402
from protocol_servers import running  # noqa: E402

from policylink.client import PolicyClient  # noqa: E402
from policylink.errors import ConnectionFailed, InferenceTimeout, ServerError, Unauthorized  # noqa: E402
from policylink.proto.v1 import policylink_pb2 as pb  # noqa: E402
from policylink.proto.v1 import policylink_pb2_grpc as pb_grpc  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402
from policylink.server.grpc_server import GrpcServer  # noqa: E402


@pytest.fixture
def grpc_server():
    engine = Engine(EchoPolicy())
    server = GrpcServer(engine, "127.0.0.1", 0)
    with running(engine, [server]):
        yield server


def test_infer_reset_and_metadata(grpc_server):
    with PolicyClient(f"grpc://127.0.0.1:{grpc_server.port}", timeout=10) as client:
        assert client.metadata is not None and client.metadata.model_id == "test/echo"
        assert client.metadata.input_features["observation.state"].shape == (6,)
        chunk = client.infer({"observation.state": np.zeros(6, np.float32), "tag": 7.0})
        assert chunk.shape == (16, 6) and chunk.dtype == np.float32
        assert np.all(chunk == 7.0)
        assert chunk.server_timing["infer_ms"] >= 0
        client.reset()
        assert client.infer({"tag": 2.0})[0, 0] == 2.0


def test_bad_request_is_an_error_and_the_server_keeps_serving(grpc_server):
    with PolicyClient(f"grpc://127.0.0.1:{grpc_server.port}", timeout=10) as client:
        with pytest.raises(ServerError, match="inference failed: ValueError: test policy asked to fail: boom"):
            client.infer({"fail": "boom"})
        assert client.infer({"tag": 1.0})[0, 0] == 1.0


def test_malformed_tensor_names_the_field(grpc_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}")
    stub = pb_grpc.PolicyServiceStub(channel)
    session = stub.GetMetadata(pb.MetadataRequest()).session_id
    bad = pb.Observation()
    bad.fields["observation.state"].tensor.CopyFrom(pb.Tensor(dtype="<f4", shape=[6], data=b"\x00" * 5))
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(bad, metadata=[("policylink-session", session)], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "observation.state: 5 bytes of data" in info.value.details()
    channel.close()


def test_malformed_protobuf_is_refused_and_server_alive(grpc_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}")
    session = pb_grpc.PolicyServiceStub(channel).GetMetadata(pb.MetadataRequest()).session_id
    raw_infer = channel.unary_unary("/policylink.v1.PolicyService/Infer")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as info:
        raw_infer(b"\xff\xff\xff\xff garbage, not protobuf", metadata=[("policylink-session", session)], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid policylink.v1.Observation protobuf message" in info.value.details()
    channel.close()
    with PolicyClient(f"grpc://127.0.0.1:{grpc_server.port}", timeout=10) as client:
        assert client.infer({"tag": 4.0})[0, 0] == 4.0


def test_timeout_then_the_late_reply_is_never_returned(grpc_server):
    with PolicyClient(f"grpc://127.0.0.1:{grpc_server.port}", timeout=10) as client:
        with pytest.raises(InferenceTimeout):
            client.infer({"tag": 1.0, "sleep_s": 1.0}, timeout=0.2)
        assert client.infer({"tag": 2.0})[0, 0] == 2.0


def test_stream_tags_each_chunk_with_its_step(grpc_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}")
    stub = pb_grpc.PolicyServiceStub(channel)

    def observations():
        for step in (5, 6, 7):
            message = pb.Observation(step=step)
            message.fields["tag"].number = float(step * 10)
            if step == 6:
                message.fields["fail"].text = "on purpose"
            yield message

    chunks = list(stub.Stream(observations(), timeout=20))
    assert [chunk.step for chunk in chunks] == [5, 6, 7]
    assert chunks[1].error == "inference failed: ValueError: test policy asked to fail: on purpose"
    assert not chunks[0].error and not chunks[2].error  # the stream went on after the refused observation
    assert [np.frombuffer(chunks[i].actions.data, np.float32)[0] for i in (0, 2)] == [50.0, 70.0]
    channel.close()


def test_unknown_session_is_refused(grpc_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}")
    stub = pb_grpc.PolicyServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.Observation(), metadata=[("policylink-session", "client-999")], timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_token_is_checked_on_every_call():
    engine = Engine(EchoPolicy())
    server = GrpcServer(engine, "127.0.0.1", 0, api_key="s3cret")
    with running(engine, [server]):
        with pytest.raises(Unauthorized, match="missing or wrong API key"):
            PolicyClient(f"grpc://127.0.0.1:{server.port}", api_key="wrong", connect_timeout=5)
        with PolicyClient(f"grpc://127.0.0.1:{server.port}", api_key="s3cret", timeout=10) as client:
            assert client.infer({"tag": 3.0})[0, 0] == 3.0
            # A call with the client's session but without the token is refused too.
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            stub = pb_grpc.PolicyServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(pb.Observation(), metadata=[("policylink-session", client._transport._session_id)], timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            channel.close()


def test_tls(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    engine = Engine(EchoPolicy())
    server = GrpcServer(engine, "127.0.0.1", 0, tls_cert=cert, tls_key=key, api_key="tok")
    with running(engine, [server]):
        with PolicyClient(f"grpcs://127.0.0.1:{server.port}", api_key="tok", ca_file=str(cert), timeout=10) as client:
            assert client.infer({"tag": 9.0})[0, 0] == 9.0
        # A plaintext client cannot talk to the TLS port.
        with pytest.raises(ConnectionFailed):
            PolicyClient(f"grpc://127.0.0.1:{server.port}", api_key="tok", connect_timeout=2)


def test_client_reconnects_after_a_server_restart():
    from conftest import free_port

    port = free_port()
    engine = Engine(EchoPolicy())
    with running(engine, [GrpcServer(engine, "127.0.0.1", port)]):
        client = PolicyClient(f"grpc://127.0.0.1:{port}", timeout=10, connect_timeout=10)
        assert client.infer({"tag": 1.0})[0, 0] == 1.0
    engine = Engine(EchoPolicy())
    with running(engine, [GrpcServer(engine, "127.0.0.1", port)]):
        # The old session is gone with the old server: the client opens a new one and retries once.
        assert client.infer({"tag": 2.0})[0, 0] == 2.0
        assert client.reconnects == 1
        client.close()


def test_base_install_needs_no_grpc():
    """Without grpc installed, ws:// works as before and grpc:// says which extra to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "from policylink.client import PolicyClient\n"
        "PolicyClient('ws://127.0.0.1:9', connect=False)\n"
        "try:\n    PolicyClient('grpc://127.0.0.1:9', connect=False)\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "grpc:// URLs need the grpc extra: pip install 'policylink[grpc]'" in out.stdout


def test_nested_observation_and_jpeg_frames_arrive_as_sent():
    from policylink.client.grpc import GrpcTransport

    seen: dict = {}

    class Recorder(EchoPolicy):
        def infer(self, obs):
            seen.update(obs)
            return super().infer({})

    engine = Engine(Recorder())
    server = GrpcServer(engine, "127.0.0.1", 0)
    frame = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))  # smooth: JPEG keeps it close
    with running(engine, [server]):
        transport = GrpcTransport(f"grpc://127.0.0.1:{server.port}", jpeg_quality=95)
        transport.connect()
        reply = transport.request({"images": {"front": frame}, "states": {"arm": np.arange(6, dtype=np.float32)}, "prompt": "stack"}, 10)
        transport.close()
    assert reply["actions"].shape == (16, 6)
    assert seen["prompt"] == "stack"
    np.testing.assert_array_equal(seen["states"]["arm"], np.arange(6, dtype=np.float32))
    assert seen["images"]["front"].shape == (48, 64, 3) and seen["images"]["front"].dtype == np.uint8
    assert np.abs(seen["images"]["front"].astype(int) - frame).mean() < 3
