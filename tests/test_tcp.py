"""Length-prefixed TCP: msgpack frames, pickled legacy frames behind trust_pickle, broken framing."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import types

import numpy as np
import pytest
from conftest import EchoPolicy
from protocol_servers import read_frame, running

from policylink.client.tcp import TcpClient
from policylink.codec import packb, unpackb
from policylink.errors import RequestError, ServerError
from policylink.server.engine import Engine
from policylink.server.tcp import TcpServer, legacy_observation
from policylink.types import Feature, PolicyMetadata


@pytest.fixture
def tcp_server():
    engine = Engine(EchoPolicy())
    server = TcpServer(engine, "127.0.0.1", 0, max_frame_bytes=1 << 20)
    with running(engine, [server]):
        yield server


def test_msgpack_round_trip_and_commands(tcp_server):
    with TcpClient("127.0.0.1", tcp_server.port) as client:
        assert client.metadata["model_id"] == "test/echo" and client.metadata["status"] == "ready"
        reply = client.request({"observation.state": np.zeros(6, np.float32), "tag": 5.0})
        assert reply["actions"].shape == (16, 6) and np.all(reply["actions"] == 5.0)
        assert "infer_ms" in reply["server_timing"]
        assert client.request({"__command__": "reset"}) == {"ok": True}
        with pytest.raises(ServerError, match="test policy asked to fail: x"):
            client.request({"fail": "x"})
        assert client.request({"tag": 1.0})["actions"][0, 0] == 1.0  # the connection survived


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    read_frame(sock)  # metadata
    return sock




def test_oversized_frame_gets_a_clear_error_and_others_are_served(tcp_server):
    sock = _raw(tcp_server.port)
    sock.sendall(struct.pack(">I", 50 << 20))
    assert read_frame(sock) == {"error": f"frame of {50 << 20} bytes exceeds the {1 << 20}-byte limit", "kind": "too_large"}
    assert sock.recv(1) == b""  # closed: the stream cannot be resynchronised
    sock.close()
    with TcpClient("127.0.0.1", tcp_server.port) as client:
        assert client.request({"tag": 2.0})["actions"][0, 0] == 2.0


def test_truncated_length_prefix_gets_a_clear_error(tcp_server):
    sock = _raw(tcp_server.port)
    sock.sendall(b"\x00\x01")
    sock.shutdown(socket.SHUT_WR)
    assert read_frame(sock) == {"error": "connection ended inside a length prefix (2 of 4 bytes)", "kind": "bad_request"}
    sock.close()
    with TcpClient("127.0.0.1", tcp_server.port) as client:
        assert client.request({"tag": 3.0})["actions"][0, 0] == 3.0


def test_malformed_msgpack_is_an_error_not_a_disconnect(tcp_server):
    with TcpClient("127.0.0.1", tcp_server.port) as client:
        client.send_frame(b"\xc1\xc1 not msgpack")
        reply = unpackb(client.recv_frame())
        assert "not valid msgpack" in reply["error"]
        assert client.request({"tag": 4.0})["actions"][0, 0] == 4.0


def test_pickle_refused_without_trust(tcp_server):
    with TcpClient("127.0.0.1", tcp_server.port) as client:
        client.send_frame(pickle.dumps({"state": np.zeros(6)}))
        assert "--trust-pickle" in unpackb(client.recv_frame())["error"]


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _LegacyObservation:  # what a legacy client pickles (its own class)
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_trusted_pickle_legacy_client_and_contained_exploit(tmp_path):
    metadata = PolicyMetadata(action_dim=6, horizon=4, input_features={"observation.state": Feature((6,))}, camera_names=("front", "wrist"), model_id="probe")

    class Probe(EchoPolicy):
        """Answers with the state's first value; remembers the observation it got."""

        seen: dict = {}

        @property
        def metadata(self):
            return metadata

        def infer(self, obs):
            Probe.seen = dict(obs)
            return {"actions": np.full((4, 6), float(obs["observation.state"][0]), np.float32)}

    engine = Engine(Probe())
    record = f"{__name__}:_LegacyObservation"
    server = TcpServer(engine, "127.0.0.1", 0, trust_pickle=True, pickle_records=[record])
    with running(engine, [server]), TcpClient("127.0.0.1", server.port) as client:
        images = np.random.default_rng(0).integers(0, 255, (2, 3, 8, 10), dtype=np.uint8)
        obs = _LegacyObservation(state=np.full(6, 3.0), image=images, raw_lang="pick the cube", timestep=12)
        client.send_frame(pickle.dumps(obs))
        actions = pickle.loads(client.recv_frame())
        assert isinstance(actions, list) and len(actions) == 4
        assert np.allclose(actions[0], 3.0) and actions[0].shape == (6,)
        assert Probe.seen["task"] == "pick the cube"
        assert np.array_equal(Probe.seen["observation.images.wrist"], np.moveaxis(images[1], 0, -1))

        marker = tmp_path / "pwned"
        client.send_frame(pickle.dumps(_Exploit(str(marker))))
        reply = pickle.loads(client.recv_frame())
        assert "refusing to unpickle posix.system" in reply["error"]
        assert not marker.exists()  # the payload's code never ran
        # The same connection still serves msgpack and pickles.
        client.send_frame(packb({"observation.state": np.full(6, 1.0, np.float32)}))
        assert unpackb(client.recv_frame())["actions"][0, 0] == 1.0
        # A class nobody named is refused with the flag that admits it.
        client.send_frame(pickle.dumps(_UnnamedObservation()))
        error = pickle.loads(client.recv_frame())["error"]
        assert f"refusing to unpickle {__name__}._UnnamedObservation" in error
        assert f"--pickle-class {__name__}:_UnnamedObservation" in error and "--legacy-tcp-port" in error


class _UnnamedObservation:  # a legacy class the server was not told about
    state = None


def test_legacy_mapping_drops_a_batch_of_one_and_refuses_more():
    batched = legacy_observation({"state": np.ones((1, 6)), "image": np.zeros((1, 2, 3, 4, 5), np.float32)}, ["a", "b"])
    assert batched["observation.state"].shape == (6,) and batched["observation.images.b"].shape == (4, 5, 3)
    assert batched["observation.images.a"].dtype == np.uint8  # float frames in [0, 1] become uint8
    with pytest.raises(RequestError, match="'state' is a batch of 2 observations"):
        legacy_observation({"state": np.ones((2, 6))}, [])
    by_space = legacy_observation({"state_ee": np.arange(7), "state_joint": np.arange(6)}, [], ctrl_space="ee")
    assert by_space["observation.state"].shape == (7,)


def test_legacy_mapping_names_cameras_in_order():
    obs = legacy_observation(types.SimpleNamespace(state=[1, 2], image=np.zeros((1, 3, 4, 5)), raw_lang="", timestep=0), ["top"])
    assert set(obs) == {"observation.state", "observation.images.top"}
    assert obs["observation.images.top"].shape == (4, 5, 3)
