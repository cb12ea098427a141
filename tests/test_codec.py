"""The msgpack codec: round trips, openpi byte compatibility, refusals, zero-copy decode."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy as openpi_codec

from policylink import codec
from policylink.codec import packb, unpackb
from policylink.errors import ProtocolError

SUPPORTED_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64,
]


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=lambda d: np.dtype(d).name)
def test_array_round_trip_every_dtype(dtype):
    rng = np.random.default_rng(0)
    array = (rng.uniform(0, 100, (3, 4, 5))).astype(dtype)
    decoded = unpackb(packb({"x": array}))["x"]
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_scalar_round_trip(dtype):
    value = np.dtype(dtype).type(7)
    decoded = unpackb(packb({"v": value}))["v"]
    assert decoded == value
    if dtype is np.float64:
        # np.float64 subclasses Python float, so msgpack sends it as a plain
        # float (openpi's codec does the same).
        assert isinstance(decoded, float)
    else:
        assert type(decoded) is type(value)


def test_big_endian_non_contiguous_and_empty_arrays():
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::3]
    empty = np.zeros((0, 14), np.float32)
    decoded = unpackb(packb({"be": big_endian, "strided": strided, "empty": empty}))
    np.testing.assert_array_equal(decoded["be"], big_endian)
    assert decoded["be"].dtype == np.dtype(">i4")
    np.testing.assert_array_equal(decoded["strided"], strided)
    assert decoded["empty"].shape == (0, 14)


def test_nested_observation_with_strings_and_numbers():
    obs = {
        "images": {"front": np.zeros((4, 4, 3), np.uint8)},
        "states": {"left_arm": np.ones(6, np.float32), "right_arm": np.ones(6, np.float32)},
        "prompt": "pick up the cube",
        "step": 12,
        "gain": 0.5,
        "flags": [1, "a", None],
    }
    decoded = unpackb(packb(obs))
    assert decoded["prompt"] == "pick up the cube"
    assert decoded["step"] == 12 and decoded["gain"] == 0.5 and decoded["flags"] == [1, "a", None]
    np.testing.assert_array_equal(decoded["states"]["right_arm"], obs["states"]["right_arm"])


@pytest.mark.parametrize(
    "value, kind",
    [
        (np.array([object()], dtype=object), "object"),
        (np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), "void"),
        (np.zeros(3, dtype=np.complex64), "complex"),
        (np.complex128(1 + 2j), "complex"),
    ],
)
def test_refused_dtypes_name_the_problem(value, kind):
    with pytest.raises(ProtocolError, match=kind):
        packb({"x": value})


def test_bytes_identical_to_openpi_codec():
    obs = {
        "observation/image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
        "observation/state": np.linspace(0, 1, 7, dtype=np.float32),
        "scalar": np.float32(1.5),
        "prompt": "do it",
    }
    assert packb(obs) == openpi_codec.packb(obs)


def test_openpi_encoded_messages_decode_and_back():
    obs = {"a": np.arange(12, dtype=np.float64).reshape(3, 4), "n": np.int64(3)}
    ours = unpackb(openpi_codec.packb(obs))
    np.testing.assert_array_equal(ours["a"], obs["a"])
    assert ours["n"] == 3 and isinstance(ours["n"], np.int64)
    theirs = openpi_codec.unpackb(packb(obs))
    np.testing.assert_array_equal(theirs["a"], obs["a"])


def test_decode_does_not_copy_image_buffer(monkeypatch):
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    message = packb({"img": image})
    # msgpack itself hands the decoder each bin field as a bytes object (that is
    # msgpack's one copy out of the message); record the one the decoder gets.
    payloads: list = []
    real_unpackb = codec.msgpack.unpackb

    def recording_unpackb(data, *, object_hook, **options):
        def hook(obj):
            if b"__ndarray__" in obj:
                payloads.append(obj[b"data"])
            return object_hook(obj)

        return real_unpackb(data, object_hook=hook, **options)

    monkeypatch.setattr(codec.msgpack, "unpackb", recording_unpackb)
    decoded = unpackb(message)["img"]
    assert len(payloads) == 1, "the decoder no longer goes through msgpack.unpackb's object_hook; update this test"
    (payload,) = payloads
    assert isinstance(payload, bytes) and payload == image.tobytes()
    # A view onto those bytes, not a fresh copy: the base chain ends at the very
    # payload object, and the array's memory lies inside it.
    assert not decoded.flags.owndata
    root = decoded
    while isinstance(root, np.ndarray):
        root = root.base
    assert root is payload, f"the array's memory belongs to a {type(root).__name__}, not to the payload msgpack decoded"
    assert np.shares_memory(decoded, np.frombuffer(payload, np.uint8))
    np.testing.assert_array_equal(decoded, image)
    assert not decoded.flags.writeable


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1\x00garbage", "not valid msgpack"),
        (packb({"x": np.zeros(100, np.float32)})[:-10], "not valid msgpack"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 7, b"dtype": "<f4", b"shape": [2]}), "need 8"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<c8", b"shape": [0]}), "complex"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "not-a-dtype", b"shape": [0]}), "numpy array: unknown dtype 'not-a-dtype'"),
        (msgpack.packb({b"__ndarray__": True, b"dtype": "<f4", b"shape": [0]}), "malformed numpy array"),
    ],
    ids=["garbage", "truncated", "short-data", "complex", "bad-dtype", "no-data"],
)
def test_malformed_messages_raise_protocol_error(payload, message):
    with pytest.raises(ProtocolError, match=message):
        unpackb(payload)
