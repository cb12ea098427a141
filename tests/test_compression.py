"""Compressed camera frames: PolicyClient / TcpClient / gRPC send JPEG, the server decodes it; hostile images are refused.

Real servers on 127.0.0.1 (WebSocket, TCP, gRPC on one engine), real clients. The
hostile cases are sent by hand, as bytes an attacker could write.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
from conftest import EchoPolicy
from protocol_servers import running
from websockets.sync.client import connect

from policylink import PolicyClient
from policylink.client.tcp import TcpClient
from policylink.codec import CompressedImage, packb, unpackb
from policylink.compression import check_image_codec, compress_images, decompress_images
from policylink.errors import ProtocolError, RequestError
from policylink.media import encode_jpeg, image_header
from policylink.server.engine import Engine
from policylink.server.tcp import TcpServer
from policylink.server.websocket import WebSocketServer

FRONT = "observation.images.front"


def camera_frame(height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """A smooth, camera-like frame (gradients and a block), which JPEG keeps close."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    frame[height // 4: height // 2, width // 4: width // 2] = rng.integers(0, 256, 3)
    return frame.astype(np.uint8)


class FrameRecorder(EchoPolicy):
    """Keeps the observations it was given; answers zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict] = []
        self.lock = threading.Lock()

    def infer(self, obs):
        with self.lock:
            self.received.append(obs)
        return super().infer({})


@pytest.fixture
def servers():
    policy = FrameRecorder()
    engine = Engine(policy)
    ws, tcp = WebSocketServer(engine, "127.0.0.1", 0), TcpServer(engine, "127.0.0.1", 0)
    started = [ws, tcp]
    try:
        from policylink.server.grpc_server import GrpcServer

        started.append(GrpcServer(engine, "127.0.0.1", 0))
    except ImportError:  # the [grpc] extra is not installed
        pass
    with running(engine, started):
        yield policy, engine, {type(server).__name__: server for server in started}


def assert_close_but_compressed(received: np.ndarray, sent: np.ndarray) -> None:
    assert received.shape == sent.shape and received.dtype == np.uint8
    difference = np.abs(received.astype(int) - sent.astype(int))
    assert difference.mean() < 3, difference.mean()
    assert difference.max() > 0, "the frame arrived bit-exact: it was not JPEG-compressed"


def test_policy_client_sends_jpeg_over_websocket_and_the_policy_gets_arrays(servers):
    policy, engine, started = servers
    frame, state = camera_frame(), np.arange(6, dtype=np.float32)
    with PolicyClient(f"ws://127.0.0.1:{started['WebSocketServer'].port}", image_codec="jpeg", quality=90) as client:
        assert "jpeg" in client.server_metadata["image_codecs"]
        chunk = client.infer({FRONT: frame, "observation.state": state, "images": {"wrist": frame}})
    assert chunk.shape == (16, 6)
    received = policy.received[-1]
    assert_close_but_compressed(received[FRONT], frame)
    assert_close_but_compressed(received["images"]["wrist"], frame)
    np.testing.assert_array_equal(received["observation.state"], state)  # only uint8 HxWx3 arrays are compressed


def test_tcp_and_grpc_clients_send_jpeg_too(servers):
    policy, _, started = servers
    frame = camera_frame(seed=1)
    with TcpClient("127.0.0.1", started["TcpServer"].port, image_codec="jpeg", quality=90) as client:
        client.request({FRONT: frame, "observation.state": np.zeros(6, np.float32)})
    assert_close_but_compressed(policy.received[-1][FRONT], frame)
    if "GrpcServer" not in started:
        pytest.skip("the [grpc] extra is not installed")
    with PolicyClient(f"grpc://127.0.0.1:{started['GrpcServer'].port}", image_codec="jpeg", quality=90) as client:
        client.infer({FRONT: frame, "observation.state": np.zeros(6, np.float32)})
    assert_close_but_compressed(policy.received[-1][FRONT], frame)


def test_raw_stays_the_default_and_is_exact(servers):
    policy, _, started = servers
    frame = camera_frame(seed=2)
    with PolicyClient(f"ws://127.0.0.1:{started['WebSocketServer'].port}") as client:
        client.infer({FRONT: frame})
    np.testing.assert_array_equal(policy.received[-1][FRONT], frame)


def test_a_server_without_a_jpeg_decoder_gets_raw_frames_and_one_warning(servers, caplog):
    policy, engine, started = servers
    engine.image_codecs = []  # as a server without any JPEG decoder announces itself
    frame = camera_frame(seed=3)
    with caplog.at_level(logging.WARNING, logger="policylink.client"):
        with PolicyClient(f"ws://127.0.0.1:{started['WebSocketServer'].port}", image_codec="jpeg") as client:
            client.infer({FRONT: frame})
            client.infer({FRONT: frame})
    np.testing.assert_array_equal(policy.received[-1][FRONT], frame)
    warnings = [record for record in caplog.records if "does not accept JPEG" in record.getMessage()]
    assert len(warnings) == 1


def hostile(url: str, image: CompressedImage | dict) -> dict:
    """Send one observation carrying ``image`` (a CompressedImage, or a raw map) by hand; the server's reply."""
    with connect(url, max_size=None, subprotocols=["policylink.v1"]) as ws:
        ws.recv(timeout=10)
        ws.send(packb({FRONT: image, "observation.state": np.zeros(6, np.float32)}))
        reply = ws.recv(timeout=10)
    # Errors are text frames; with the policylink.v1 subprotocol, JSON with the error's kind.
    return json.loads(reply) if isinstance(reply, str) else unpackb(reply)


def corrupt_cases() -> dict[str, tuple[CompressedImage | dict, str]]:
    good = encode_jpeg(camera_frame(), 90)
    bomb = bytearray(good)
    sof = bomb.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    bomb[sof + 5: sof + 9] = (20000).to_bytes(2, "big") + (20000).to_bytes(2, "big")
    png = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + (160).to_bytes(4, "big") + (120).to_bytes(4, "big") + bytes(5)
    return {
        "garbage": (CompressedImage("jpeg", b"\xff\xd8\xff" + bytes(200), (120, 160, 3)), "not a decodable JPEG image"),
        "truncated": (CompressedImage("jpeg", good[: len(good) // 2], (120, 160, 3)), "not a decodable JPEG image"),
        "header bigger than declared": (CompressedImage("jpeg", bytes(bomb), (120, 160, 3)), "its header says 20000x20000 pixels"),
        "declared bomb": (CompressedImage("jpeg", bytes(bomb), (20000, 20000, 3)), "pixel limit (max_image_pixels)"),
        "png said to be jpeg": (CompressedImage("jpeg", png, (120, 160, 3)), "the message says jpeg, the data is PNG"),
        "unknown format": ({b"__image__": True, b"format": "webp", b"data": good, b"shape": [120, 160, 3]}, "unknown format 'webp'"),
        "bad shape": ({b"__image__": True, b"format": "jpeg", b"data": good, b"shape": [120, 160]}, "shape must be [height, width, 3]"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_and_oversized_images_get_named_errors_and_the_server_keeps_serving(servers, case):
    policy, _, started = servers
    url = f"ws://127.0.0.1:{started['WebSocketServer'].port}"
    image, expected = corrupt_cases()[case]
    before = len(policy.received)
    reply = hostile(url, image)
    assert reply.get("kind") == "bad_request", reply
    assert expected in reply["message"], reply["message"]
    if isinstance(image, CompressedImage) and case != "declared bomb":
        assert FRONT in reply["message"], "the error names the key"
    assert len(policy.received) == before, "a refused image never reaches the policy"
    with PolicyClient(url, image_codec="jpeg") as client:  # and everyone else is served as before
        client.infer({FRONT: camera_frame(), "observation.state": np.zeros(6, np.float32)})
    assert len(policy.received) == before + 1


def test_the_python_client_raises_a_typed_error_for_an_image_the_server_refuses(servers):
    _, _, started = servers
    with PolicyClient(f"ws://127.0.0.1:{started['WebSocketServer'].port}") as client:
        with pytest.raises(RequestError, match="compressed image refused"):
            client.infer({FRONT: CompressedImage("jpeg", b"\xff\xd8\xff" + bytes(64), (120, 160, 3))})


def test_a_bomb_is_refused_before_any_pixel_is_decoded():
    frame = camera_frame()
    data = bytearray(encode_jpeg(frame, 90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    assert image_header(bytes(data))[1:] == (30000, 30000)
    with pytest.raises(ProtocolError, match="pixel limit"):
        unpackb(packb({FRONT: CompressedImage("jpeg", bytes(data), (30000, 30000, 3))}))


def test_compress_and_decompress_round_trip_nested_maps():
    frame = camera_frame(seed=4)
    obs = {"images": {"front": frame, "wrist": frame}, "state": np.ones(3, np.float32), "mask": np.zeros((4, 4), np.uint8)}
    wire = compress_images(obs, 80)
    assert isinstance(wire["images"]["front"], CompressedImage) and wire["images"]["front"].format == "jpeg"
    assert wire["mask"] is obs["mask"] and wire["state"] is obs["state"]
    back = decompress_images(unpackb(packb(wire)))
    assert_close_but_compressed(back["images"]["wrist"], frame)
    assert len(packb(wire)) < len(packb(obs)) / 5


@pytest.mark.parametrize("codec, quality, message", [("webp", 90, "unknown image codec 'webp'"), ("jpeg", 0, "quality must be an integer from 1 to 100")])
def test_bad_codec_settings_are_refused(codec, quality, message):
    with pytest.raises(ValueError, match=message):
        check_image_codec(codec, quality)
    with pytest.raises(ValueError, match=message):
        PolicyClient("ws://127.0.0.1:9", image_codec=codec, quality=quality, connect=False)
