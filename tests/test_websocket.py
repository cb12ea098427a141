"""The WebSocket server and PolicyClient over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.sync.client import connect

from conftest import EchoPolicy, free_port
from websockets.exceptions import ConnectionClosed

from policylink import (
    ConnectionFailed,
    InferenceTimeout,
    PolicyClient,
    ProtocolError,
    ServerError,
)
from policylink.errors import RequestTooLarge, Unauthorized
from policylink.codec import packb, unpackb
from policylink.policies import ConstantPolicy, ReplayPolicy
from policylink.server.background import BackgroundServer

STATE = {"observation.state": np.zeros(6, np.float32)}


def test_metadata_first_frame_carries_policy_and_roboarena_fields(serve):
    policy = ReplayPolicy(action_dim=14, horizon=50, cameras={"front": (224, 224), "wrist_left": (224, 224)})
    server = serve(policy)
    with connect(server.url) as ws:
        frame = unpackb(ws.recv(timeout=5))
    assert frame["action_dim"] == 14 and frame["horizon"] == 50
    assert frame["input_features"]["observation.images.front"] == {"shape": [224, 224, 3], "dtype": "uint8"}
    assert frame["camera_names"] == ["front", "wrist_left"]
    assert frame["image_resolution"] == [224, 224]
    assert frame["n_external_cameras"] == 1
    assert frame["needs_wrist_camera"] is True
    assert frame["action_space"] == "joint_position"
    assert "replay" in frame["description"]


def test_infer_returns_chunk_and_server_timing(serve):
    server = serve(ConstantPolicy(value=0.25, action_dim=6, horizon=16))
    with PolicyClient(server.url) as client:
        first = client.infer(STATE)
        second = client.infer(STATE)
    assert first.shape == (16, 6) and first.dtype == np.float32
    np.testing.assert_array_equal(first, np.full((16, 6), 0.25, np.float32))
    assert first["actions"].shape == (16, 6)  # openpi-style access works too
    assert first.server_timing["infer_ms"] >= 0
    assert "prev_total_ms" not in first.server_timing
    # The first request's server-side total covers its decoding and inference, and fits in its round trip.
    previous = second.server_timing["prev_total_ms"]
    assert previous >= first.server_timing["decode_ms"] + first.server_timing["infer_ms"] - 0.002  # timings are rounded to 1 us
    assert previous < first.reply["client_timing"]["roundtrip_ms"]
    assert client.metadata.model_id == "builtin/constant"


def test_openpi_client_drives_our_server_unchanged(serve):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    server = serve(ReplayPolicy(action_dim=14, horizon=50))
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    assert client.get_server_metadata()["action_dim"] == 14
    reply = client.infer({"observation/state": np.zeros(14, np.float32), "prompt": "fold"})
    assert reply["actions"].shape == (50, 14)
    np.testing.assert_allclose(reply["actions"], server.engine.default_model.policy.trajectory[:50])
    assert reply["server_timing"]["infer_ms"] >= 0


def test_per_client_sessions_and_reset(serve):
    server = serve(ReplayPolicy(action_dim=3, horizon=4))
    trajectory = server.engine.default_model.policy.trajectory
    with PolicyClient(server.url) as a, PolicyClient(server.url) as b:
        np.testing.assert_allclose(a.infer(STATE), trajectory[0:4])
        np.testing.assert_allclose(a.infer(STATE), trajectory[4:8])
        np.testing.assert_allclose(b.infer(STATE), trajectory[0:4])  # b has its own position
        a.reset()
        np.testing.assert_allclose(a.infer(STATE), trajectory[0:4])


def test_slow_inference_of_one_client_does_not_stall_another(serve):
    policy = EchoPolicy()
    server = serve(policy)
    finished: list[str] = []

    def slow() -> None:
        with PolicyClient(server.url) as client:
            client.infer({"tag": 1.0, "sleep_s": 2.0})
            finished.append("slow")

    thread = threading.Thread(target=slow)
    with PolicyClient(server.url) as fast:
        thread.start()
        policy.wait_started(1)  # the slow request is running on the server
        for i in range(10):
            np.testing.assert_array_equal(fast.infer({"tag": float(i)})[0], np.full(6, i, np.float32))
            finished.append("fast")
    thread.join()
    assert finished == ["fast"] * 10 + ["slow"]


def test_stalled_raw_connection_does_not_stall_others(serve):
    server = serve(EchoPolicy())
    with socket.create_connection(("127.0.0.1", server.port)) as stalled:
        stalled.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")  # and never finishes
        with PolicyClient(server.url, timeout=5) as client:
            assert client.infer({"tag": 3.0})[0, 0] == 3.0


def test_garbage_and_wrong_typed_requests_get_clear_errors_and_server_lives(serve):
    server = serve(EchoPolicy())
    with connect(server.url) as ws, PolicyClient(server.url) as bystander:
        ws.recv(timeout=5)  # metadata
        cases = [
            (b"\xc1\xff\x00 not msgpack", "not valid msgpack"),
            (packb([1, 2, 3]), "must be a msgpack map, got list"),
            ("hello", "expected a binary msgpack frame"),
            (packb({"__command__": "explode"}), "unknown command 'explode'"),
            (packb({"fail": "wrong shape"}), "inference failed: ValueError: test policy asked to fail: wrong shape"),
            (b"\x81\xa1x\x84\xc4\x0b__ndarray__\xc3\xc4\x04data\xc4\x00\xc4\x05dtype\xa3<c8\xc4\x05shape\x91\x00", "complex"),
        ]
        for payload, message in cases:
            ws.send(payload)
            reply = ws.recv(timeout=5)
            assert isinstance(reply, str), "errors travel as text frames"
            assert message in reply
            # The same connection and other connections keep working.
            ws.send(packb({"tag": 5.0}))
            assert unpackb(ws.recv(timeout=5))["actions"][0, 0] == 5.0
            assert bystander.infer({"tag": 2.0})[0, 0] == 2.0


def test_policy_error_raises_server_error_with_message(serve):
    server = serve(EchoPolicy())
    with PolicyClient(server.url) as client:
        with pytest.raises(ServerError, match="test policy asked to fail: nan in state"):
            client.infer({"fail": "nan in state"})
        assert client.infer({"tag": 1.0})[0, 0] == 1.0


def test_oversized_message_is_refused_clearly_and_server_lives(serve):
    server = serve(EchoPolicy(), max_message_bytes=1 << 20)
    with PolicyClient(server.url, max_message_bytes=8 << 20) as big, PolicyClient(server.url) as other:
        # The server announces its limit: our client refuses before sending, naming both sizes.
        assert big.server_metadata["max_message_bytes"] == 1 << 20
        with pytest.raises(RequestTooLarge, match="the server accepts at most 1048576"):
            big.infer({"img": np.zeros((2 << 20,), np.uint8)})
        assert big.infer({"tag": 6.0})[0, 0] == 6.0  # nothing was sent: the connection goes on
    # A client that sends anyway (openpi's does not check) is refused by the server as too big.
    with connect(server.url, max_size=None) as ws:
        ws.recv(timeout=5)
        ws.send(packb({"img": np.zeros((2 << 20,), np.uint8)}))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1009
    with PolicyClient(server.url) as other:
        assert other.infer({"tag": 4.0})[0, 0] == 4.0


def test_client_refuses_to_send_over_its_own_limit(serve):
    server = serve(EchoPolicy())
    with PolicyClient(server.url, max_message_bytes=1000) as client:
        with pytest.raises(ProtocolError, match="over the 1000-byte limit"):
            client.infer({"img": np.zeros(5000, np.uint8)})


def test_truncated_frame_then_disconnect_leaves_server_serving(serve):
    server = serve(EchoPolicy())
    with connect(server.url) as ws:
        ws.recv(timeout=5)
        raw = ws.socket
        # A masked binary frame header announcing 1000 bytes, then only 10, then gone.
        raw.sendall(bytes([0x82, 0x80 | 126]) + (1000).to_bytes(2, "big") + b"\x00\x00\x00\x00" + b"x" * 10)
        raw.shutdown(socket.SHUT_RDWR)
    with PolicyClient(server.url) as client:
        assert client.infer({"tag": 7.0})[0, 0] == 7.0


def test_timed_out_reply_is_never_handed_to_a_later_request(serve):
    server = serve(EchoPolicy())
    with PolicyClient(server.url, timeout=0.3) as client:
        with pytest.raises(InferenceTimeout):
            client.infer({"tag": 1.0, "sleep_s": 1.0})
        chunk = client.infer({"tag": 2.0}, timeout=5.0)
        np.testing.assert_array_equal(chunk, np.full((16, 6), 2.0, np.float32))
        assert client.infer({"tag": 3.0}, timeout=5.0)[0, 0] == 3.0


def test_client_waits_for_server_that_is_not_up_yet():
    port = free_port()
    server = BackgroundServer(EchoPolicy(), host="127.0.0.1", port=port)
    timer = threading.Timer(1.0, server.start)
    timer.start()
    try:
        with PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=20) as client:
            assert client.infer({"tag": 1.0})[0, 0] == 1.0
    finally:
        timer.join()
        server.stop()


def test_connect_gives_up_with_typed_error():
    with pytest.raises(ConnectionFailed, match="no policy server"):
        PolicyClient(f"ws://127.0.0.1:{free_port()}", connect_timeout=0.5)


def test_client_reconnects_after_server_restart():
    port = free_port()
    first = BackgroundServer(ConstantPolicy(value=1.0), host="127.0.0.1", port=port).start()
    client = PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=20)
    try:
        assert client.infer(STATE)[0, 0] == 1.0
        first.stop()
        second = BackgroundServer(ConstantPolicy(value=2.0), host="127.0.0.1", port=port)
        threading.Timer(0.5, second.start).start()
        assert client.infer(STATE)[0, 0] == 2.0  # waited, reconnected, resent
        assert client.reconnects == 1
        second.stop()
    finally:
        client.close()


def test_api_key_is_checked(serve):
    server = serve(EchoPolicy(), api_key="s3cret")
    with pytest.raises(Unauthorized, match="401"):
        PolicyClient(server.url, connect_timeout=2)
    with pytest.raises(Unauthorized, match="401"):
        PolicyClient(server.url, api_key="s3cret-but-longer", connect_timeout=2)
    with PolicyClient(server.url, api_key="s3cret") as client:
        assert client.infer({"tag": 1.0})[0, 0] == 1.0


def test_healthz(serve):
    server = serve(EchoPolicy())
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
        assert response.status == 200
        body = json.loads(response.read())
    assert body["status"] == "ok" and body["ready"] is True


def test_idle_server_says_so(serve):
    server = serve(None)
    with PolicyClient(server.url) as client:
        assert client.metadata is None
        assert client.server_metadata["status"] == "idle"
        with pytest.raises(ServerError, match="no model loaded"):
            client.infer(STATE)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
        assert json.loads(response.read())["ready"] is False


def test_our_client_against_an_openpi_style_server():
    """A server written the way openpi's reference server works, with openpi-client's codec."""
    import asyncio

    from openpi_client import msgpack_numpy
    from websockets.asyncio.server import serve as ws_serve

    port = free_port()
    stop = threading.Event()

    async def handler(ws):
        packer = msgpack_numpy.Packer()
        await ws.send(packer.pack({"action_dim": 7, "horizon": 10}))
        async for message in ws:
            obs = msgpack_numpy.unpackb(message)
            if "boom" in obs:
                await ws.send("Traceback: KeyError: 'boom'")
                continue
            state = obs["observation/state"]
            await ws.send(packer.pack({"actions": np.tile(state, (10, 1)), "server_timing": {"infer_ms": 1.0}}))

    async def main():
        async with ws_serve(handler, "127.0.0.1", port, compression=None, max_size=None):
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(main()))
    thread.start()
    try:
        with PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=10) as client:
            assert client.metadata.action_dim == 7
            state = np.arange(7, dtype=np.float32)
            chunk = client.infer({"observation/state": state})
            assert chunk.shape == (10, 7)
            np.testing.assert_array_equal(chunk[3], state)
            with pytest.raises(ServerError, match="KeyError"):
                client.infer({"boom": 1})
    finally:
        stop.set()
        thread.join()
