"""Real-time chunking over gRPC: Observation.rtc / .seed and Metadata.rtc, against real servers on 127.0.0.1."""

from __future__ import annotations

import re

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from protocol_servers import running  # noqa: E402

from policylink.client import PolicyClient  # noqa: E402
from policylink.errors import ProtocolError, RequestError  # noqa: E402
from policylink.limits import DecodeLimits  # noqa: E402
from policylink.policies.builtin import make_builtin_policy  # noqa: E402
from policylink.proto import convert  # noqa: E402
from policylink.proto.v1 import policylink_pb2 as pb  # noqa: E402
from policylink.proto.v1 import policylink_pb2_grpc as pb_grpc  # noqa: E402
from policylink.rtc import RTCRequest, RTCSupport  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402
from policylink.server.grpc_server import GrpcServer  # noqa: E402
from policylink.types import PolicyMetadata  # noqa: E402

ACTION_DIM, HORIZON = 6, 16


def _serve(policy):
    engine = Engine(policy)
    server = GrpcServer(engine, "127.0.0.1", 0)
    with running(engine, [server]):
        yield server


@pytest.fixture(scope="module")
def flow_server():
    pytest.importorskip("torch")
    pytest.importorskip("lerobot")
    yield from _serve(make_builtin_policy("flow", action_dim=ACTION_DIM, horizon=HORIZON))


@pytest.fixture(scope="module")
def random_server():
    yield from _serve(make_builtin_policy("random", action_dim=ACTION_DIM, horizon=HORIZON))


def _client(server) -> PolicyClient:
    return PolicyClient(f"grpc://127.0.0.1:{server.port}", timeout=20)


def _rtc(prefix=None, delay=2, execution_horizon=6, **extra):
    prefix = np.full((8, ACTION_DIM), 0.1, np.float32) if prefix is None else prefix
    return {"prefix": prefix, "delay": delay, "execution_horizon": execution_horizon, **extra}


class _Stub:
    """A raw stub with its own session, to see status codes and trailers."""

    def __init__(self, server) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.PolicyServiceStub(self.channel)
        self.metadata = self.stub.GetMetadata(pb.MetadataRequest(), timeout=10)
        self.headers = [("policylink-session", self.metadata.session_id)]

    def infer(self, message: pb.Observation) -> pb.ActionChunk:
        return self.stub.Infer(message, metadata=self.headers, timeout=20)

    def refused(self, message: pb.Observation) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.infer(message)
        return info.value

    def close(self) -> None:
        self.channel.close()


# -- (a) metadata ---------------------------------------------------------------


def test_metadata_announces_rtc_support(flow_server, random_server):
    with _client(flow_server) as client:
        assert client.metadata.rtc == RTCSupport(guidance=10.0, max_guidance=50.0, schedule="linear", execution_horizon=10)
        assert client.server_metadata["rtc"] == client.metadata.rtc.to_dict()
    raw = _Stub(flow_server)
    assert raw.metadata.HasField("rtc") and raw.metadata.rtc.execution_horizon == 10 and raw.metadata.rtc.schedule == "linear"
    raw.close()

    with _client(random_server) as client:
        assert client.metadata.rtc is None and client.server_metadata["rtc"] is None
    raw = _Stub(random_server)
    assert not raw.metadata.HasField("rtc")
    raw.close()


def test_metadata_frame_round_trip():
    support = RTCSupport(guidance=4.0, max_guidance=8.0, schedule="exp", execution_horizon=5)
    frame = PolicyMetadata(action_dim=6, horizon=16, model_id="m", rtc=support).to_dict()
    message = convert.frame_to_metadata(frame, "s")
    assert (message.rtc.guidance, message.rtc.max_guidance, message.rtc.schedule, message.rtc.execution_horizon) == (4.0, 8.0, "exp", 5)
    assert PolicyMetadata.from_dict(convert.metadata_to_frame(pb.Metadata.FromString(message.SerializeToString()))).rtc == support
    assert not convert.frame_to_metadata({**frame, "rtc": None}).HasField("rtc")
    assert convert.metadata_to_frame(convert.frame_to_metadata({**frame, "rtc": None}))["rtc"] is None
    # An rtc message with fields left at 0 / empty: RTCSupport's defaults.
    partial = pb.Metadata(status="ready", action_dim=6, horizon=16, rtc=pb.RealTimeChunkingSupport(execution_horizon=3))
    assert PolicyMetadata.from_dict(convert.metadata_to_frame(partial)).rtc == RTCSupport(execution_horizon=3)


# -- (b) seeds and guidance -------------------------------------------------------


def test_same_seed_same_chunk_and_rtc_follows_the_prefix(flow_server):
    with _client(flow_server) as client:
        first = np.asarray(client.infer({"step": 0, "__seed__": 1}))
        again = np.asarray(client.infer({"step": 0, "__seed__": 1}))
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, np.asarray(client.infer({"step": 0, "__seed__": 2})))

        prefix = first[8:].copy()  # the tail not executed yet when the next chunk (from step 8) is asked for
        plain = np.asarray(client.infer({"step": 8, "__seed__": 5}))
        guided = np.asarray(client.infer({"step": 8, "__seed__": 5, "__rtc__": _rtc(prefix, delay=2, execution_horizon=6)}))
        assert guided.shape == (HORIZON, ACTION_DIM)
        plain_error = np.abs(plain[:2] - prefix[:2]).mean()
        guided_error = np.abs(guided[:2] - prefix[:2]).mean()
        assert guided_error < 0.2 * plain_error, (guided_error, plain_error)
        assert guided_error < 0.03

        # An RTCRequest object goes through as its wire map; the same seed and fields give the same chunk.
        request = RTCRequest(prefix, delay=2, execution_horizon=6)
        np.testing.assert_array_equal(np.asarray(client.infer({"step": 8, "__seed__": 5, "__rtc__": request})), guided)
        # None for either field: not sent.
        assert client.infer({"step": 8, "__seed__": None, "__rtc__": None}).shape == (HORIZON, ACTION_DIM)


def test_rtc_and_seed_over_a_stream(flow_server):
    raw = _Stub(flow_server)

    def observations():
        for step, rtc in ((1, _rtc()), (2, _rtc(delay=-1)), (3, _rtc())):
            message = convert.observation_to_proto({"step": 8, "__seed__": 3, "__rtc__": rtc}, step=step)
            yield message

    chunks = list(raw.stub.Stream(observations(), metadata=raw.headers, timeout=30))
    assert [chunk.step for chunk in chunks] == [1, 2, 3]
    assert "'__rtc__.delay'" in chunks[1].error and chunks[1].error_kind == "bad_request"
    first, third = (np.frombuffer(chunks[i].actions.data, np.float32) for i in (0, 2))
    np.testing.assert_array_equal(first, third)
    raw.close()


# -- (c) bad fields ---------------------------------------------------------------


BAD_FIELDS = [
    pytest.param(_rtc(np.zeros((8, 5), np.float32)), r"'__rtc__\.prefix' has 5 values per step; the policy's actions have 6", id="prefix-width"),
    pytest.param(_rtc(delay=-1), r"'__rtc__\.delay' must be a whole number >= 0, got '-1'", id="negative-delay"),
    pytest.param(_rtc(delay=7, execution_horizon=6), r"'__rtc__\.delay' \(7\) is past the execution horizon \(6\)", id="delay-past-horizon"),
    pytest.param(_rtc(delay=2, execution_horizon=20), r"'__rtc__\.execution_horizon' \(20\) is past the policy's chunk length \(16\)", id="horizon-past-chunk"),
    pytest.param(_rtc(schedule="cosine"), r"'__rtc__\.schedule' must be one of", id="unknown-schedule"),
    pytest.param(_rtc(guidance=60.0), r"'__rtc__\.guidance' \(60\) is above this server's limit \(50\)", id="guidance-over-limit"),
    pytest.param(_rtc(np.full((8, ACTION_DIM), np.nan, np.float32)), r"'__rtc__\.prefix' holds non-finite values", id="nan-prefix"),
]


@pytest.mark.parametrize("rtc, match", BAD_FIELDS)
def test_bad_rtc_fields_are_named_and_the_server_keeps_serving(flow_server, rtc, match):
    raw = _Stub(flow_server)
    error = raw.refused(convert.observation_to_proto({"step": 0, "__rtc__": rtc}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())["policylink-error-kind"] == "bad_request"
    assert re.search(match, error.details()), error.details()
    assert raw.infer(convert.observation_to_proto({"step": 0})).actions.shape == [HORIZON, ACTION_DIM]
    raw.close()

    with _client(flow_server) as client:
        with pytest.raises(RequestError, match=match):
            client.infer({"step": 0, "__rtc__": rtc})
        assert client.infer({"step": 0, "__rtc__": _rtc()}).shape == (HORIZON, ACTION_DIM)


def test_bad_seed_and_misplaced_fields_are_refused(flow_server):
    raw = _Stub(flow_server)
    error = raw.refused(pb.Observation(seed=2**63))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'__seed__' must be a whole number in [0, 2**63)" in error.details()

    # The msgpack keys sent as plain fields: refused, pointing at the typed fields.
    for key, field in (("__rtc__", "rtc"), ("__seed__", "seed")):
        message = pb.Observation()
        message.fields[key].number = 3.0
        error = raw.refused(message)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{key}' travels in the Observation.{field} field over gRPC" in error.details()

    # An rtc message without a prefix, and a prefix whose bytes do not match its shape.
    error = raw.refused(pb.Observation(rtc=pb.RealTimeChunking(delay=1, execution_horizon=4)))
    assert "'__rtc__' needs 'prefix'" in error.details()
    bad = pb.Observation(rtc=pb.RealTimeChunking(prefix=pb.Tensor(dtype="<f4", shape=[8, 6], data=b"\0" * 5), delay=1, execution_horizon=4))
    assert "__rtc__.prefix: 5 bytes of data" in raw.refused(bad).details()
    assert raw.infer(pb.Observation()).actions.shape == [HORIZON, ACTION_DIM]
    raw.close()


@pytest.mark.parametrize(
    "obs, match",
    [
        ({"__seed__": -1}, r"'__seed__' must be a whole number in \[0, 2\*\*63\)"),
        ({"__seed__": 1.5}, r"'__seed__' must be a whole number"),
        ({"__rtc__": [1, 2]}, r"'__rtc__' must be a map"),
        ({"__rtc__": _rtc(guidence=3.0)}, r"'__rtc__' has unknown field\(s\) \['guidence'\]"),
        ({"__rtc__": {"prefix": np.zeros((2, 6)), "execution_horizon": 4}}, r"'__rtc__' needs 'delay'"),
        ({"__rtc__": _rtc(delay=2.0)}, r"'__rtc__\.delay' must be a whole number"),
        ({"__rtc__": _rtc(execution_horizon=2**40)}, r"'__rtc__\.execution_horizon' must be a whole number"),
        ({"__rtc__": _rtc(delay=True)}, r"'__rtc__\.delay' must be a whole number"),
        ({"__rtc__": _rtc(guidance=0)}, r"'__rtc__\.guidance' must be a number > 0"),
        ({"__rtc__": _rtc(schedule="")}, r"'__rtc__\.schedule' must be one of"),
    ],
)
def test_values_the_typed_fields_cannot_hold_are_refused_before_sending(obs, match):
    with pytest.raises(RequestError, match=match):
        convert.observation_to_proto(obs)


# -- (d) a policy without RTC support ------------------------------------------------


def test_policy_without_rtc_ignores_valid_fields(random_server):
    with _client(random_server) as client:
        assert client.metadata.rtc is None
        chunk = client.infer({"__rtc__": _rtc(), "__seed__": 4})
        assert chunk.shape == (HORIZON, ACTION_DIM) and np.all(np.abs(chunk) <= 1)
        # Still checked where the fields themselves are malformed (as on every protocol).
        with pytest.raises(RequestError, match=r"'__rtc__\.delay'"):
            client.infer({"__rtc__": _rtc(delay=-1)})
        assert client.infer({}).shape == (HORIZON, ACTION_DIM)


# -- conversion and limits ----------------------------------------------------------


def test_conversion_round_trip():
    prefix = np.arange(24, dtype=np.float32).reshape(4, 6)
    obs = {"observation.state": np.zeros(6, np.float32), "task": "pick",
           "__rtc__": _rtc(prefix, delay=1, execution_horizon=3, guidance=2.5, schedule="exp"), "__seed__": np.uint32(9)}
    message = convert.observation_to_proto(obs, step=4)
    assert set(message.fields) == {"observation.state", "task"}
    assert message.HasField("rtc") and message.seed == 9
    back = convert.observation_from_bytes(message.SerializeToString())
    assert back["__seed__"] == 9 and back["task"] == "pick"
    rtc = back["__rtc__"]
    assert set(rtc) == {"prefix", "delay", "execution_horizon", "guidance", "schedule"}
    np.testing.assert_array_equal(rtc["prefix"], prefix)
    assert (rtc["delay"], rtc["execution_horizon"], rtc["guidance"], rtc["schedule"]) == (1, 3, 2.5, "exp")
    assert RTCRequest.from_wire(rtc).resolved(RTCSupport()) == (2.5, "exp", 3)

    # guidance / schedule not given: left out, so the server's defaults apply; no seed: none decoded.
    back = convert.observation_from_bytes(convert.observation_to_proto({"__rtc__": _rtc(delay=0)}).SerializeToString())
    assert set(back) == {"__rtc__"} and set(back["__rtc__"]) == {"prefix", "delay", "execution_horizon"}
    assert back["__rtc__"]["delay"] == 0
    assert convert.observation_from_bytes(convert.observation_to_proto({"__seed__": 0}).SerializeToString()) == {"__seed__": 0}
    assert convert.observation_from_bytes(convert.observation_to_proto({"a": 1.0}).SerializeToString()) == {"a": 1.0}


def test_prefix_is_bounded_by_the_decode_limits():
    prefix = pb.Tensor(dtype="<f4", shape=[1] * 40, data=b"\0" * 4)
    data = pb.Observation(rtc=pb.RealTimeChunking(prefix=prefix, delay=0, execution_horizon=1)).SerializeToString()
    with pytest.raises(ProtocolError, match=r"policylink\.v1\.Tensor\.shape has more than 32 values \(limit max_ndim=32\)"):
        convert.observation_from_bytes(data)  # by the wire check, before parsing
    small = pb.Observation(rtc=pb.RealTimeChunking(prefix=pb.Tensor(dtype="<f4", shape=[1, 1, 1], data=b"\0" * 4)))
    with pytest.raises(ProtocolError, match=r"Tensor\.shape has more than 2 values \(limit max_ndim=2\)"):
        convert.observation_from_bytes(small.SerializeToString(), DecodeLimits(max_ndim=2))
    # A parsed message is checked again when the tensor is decoded, naming the field.
    with pytest.raises(ProtocolError, match=r"^__rtc__\.prefix: shape has 3 dimensions \(limit max_ndim=2\)"):
        convert.proto_to_observation(small, DecodeLimits(max_ndim=2))
    # Observation (1) > rtc (2) > prefix (3): nested like a tensor field, refused below that depth.
    with pytest.raises(ProtocolError, match=r"nests deeper than 2 levels at field policylink\.v1\.RealTimeChunking\.prefix"):
        convert.observation_from_bytes(small.SerializeToString(), DecodeLimits(max_depth=2))
    with pytest.raises(ProtocolError, match=r"string field policylink\.v1\.RealTimeChunking\.schedule is 65 bytes \(limit max_str_bytes=64\)"):
        convert.observation_from_bytes(pb.Observation(rtc=pb.RealTimeChunking(schedule="x" * 65)).SerializeToString(), DecodeLimits(max_str_bytes=64))
    many = pb.Tensor(dtype="<f4", shape=[8, 6], data=bytes(8 * 6 * 4))
    ok = pb.Observation(rtc=pb.RealTimeChunking(prefix=many, delay=1, execution_horizon=2), seed=3).SerializeToString()
    assert convert.observation_from_bytes(ok)["__rtc__"]["prefix"].shape == (8, 6)


def test_execution_horizon_zero_means_the_servers_default(flow_server):
    """0 on the wire is the server's default, so the client refuses an explicit 0 before sending it."""
    with pytest.raises(RequestError, match=r"'__rtc__\.execution_horizon' must be a whole number >= 1, got '0'"):
        convert.observation_to_proto({"step": 0, "__rtc__": _rtc(execution_horizon=0)})
    prefix = np.zeros((8, ACTION_DIM), np.float32)
    raw = _Stub(flow_server)
    default = raw.infer(convert.observation_to_proto({"step": 3, "__seed__": 5, "__rtc__": {"prefix": prefix, "delay": 2}}))
    explicit = raw.infer(convert.observation_to_proto({"step": 3, "__seed__": 5, "__rtc__": {"prefix": prefix, "delay": 2, "execution_horizon": 8}}))
    shorter = raw.infer(convert.observation_to_proto({"step": 3, "__seed__": 5, "__rtc__": {"prefix": prefix, "delay": 2, "execution_horizon": 3}}))
    raw.close()
    # The flow policy's default is 10, clamped to the 8-step prefix: the same as asking for 8.
    assert default.actions.data == explicit.actions.data != shorter.actions.data
