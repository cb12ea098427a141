"""Bounded decoding: hostile messages are refused fast, naming the limit; legit ones decode as before.

Each hostile input is measured: wall time under 0.2 s and resident memory
growth (``/proc/self/statm``, and the process peak from ``getrusage``) under
100 MB, inputs built beforehand.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import io
import os
import random
import re
import resource
import struct
import threading
import time
import zlib
from typing import Any

import msgpack
import numpy as np
import pytest

import policylink.codec as codec
import policylink.media as media
import policylink.proto.convert as convert
from policylink.codec import packb, unpackb
from policylink.compression import compress_images
from policylink.errors import ProtocolError
from policylink.limits import DEFAULT_LIMITS, DecodeLimits
from policylink.proto.v1 import policylink_pb2 as pb
from policylink.server.engine import Engine, Request

from conftest import EchoPolicy

Image = pytest.importorskip("PIL.Image")

MAX_SECONDS = 0.2
MAX_GROWTH = 100 * 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def refused(call: Any, *args: Any, match: str, error: type[Exception] = ProtocolError) -> str:
    """Run ``call(*args)``: it must raise ``error`` matching ``match``, fast and without growing memory."""
    gc.collect()
    rss, peak = _rss(), _peak()
    started = time.perf_counter()
    with pytest.raises(error) as info:
        call(*args)
    elapsed = time.perf_counter() - started
    growth = max(_rss() - rss, _peak() - peak)
    message = str(info.value)
    assert re.search(match, message), message
    assert elapsed < MAX_SECONDS, f"took {elapsed:.3f} s: {message}"
    assert growth < MAX_GROWTH, f"memory grew by {growth / 2**20:.0f} MiB: {message}"
    return message


# -- msgpack --------------------------------------------------------------------

ELEMENTS = r"more than 100000 elements \(limit max_elements=100000\); send arrays as numpy arrays"


@functools.cache
def _empty_arrays_in_one_array() -> bytes:
    count = 24_000_000  # 24 MiB: inside the 64 MiB message limit
    return b"\xdd" + struct.pack(">I", count) + b"\x90" * count


@functools.cache
def _nested_5000_by_5000() -> bytes:
    inner = b"\xdc" + struct.pack(">H", 5000) + b"\x90" * 5000
    return b"\xdc" + struct.pack(">H", 5000) + inner * 5000


@functools.cache
def _open_containers() -> bytes:
    # 200 nested arrays, each announcing 100_000 items (within a per-array limit)
    # and filled with 99_999 of them before the next level opens: no container
    # ever closes, so counting in msgpack's hooks would see nothing.
    level = b"\xdd" + struct.pack(">I", 100_000) + b"\x00" * 99_999
    return level * 200 + b"\xc0"


def test_msgpack_element_bomb_in_one_array():
    refused(codec.unpackb, _empty_arrays_in_one_array(), match=ELEMENTS)


def test_msgpack_element_bomb_nested():
    refused(codec.unpackb, _nested_5000_by_5000(), match=ELEMENTS)


def test_msgpack_bomb_of_containers_that_never_close():
    refused(codec.unpackb, _open_containers(), match=ELEMENTS)


def test_msgpack_map_entries_count_as_keys_and_values():
    bomb = b"\xdf" + struct.pack(">I", 60_000) + b"\x00\x00" * 60_000
    refused(codec.unpackb, bomb, match=ELEMENTS)


@pytest.mark.parametrize("level", [b"\x91", b"\x81\xa1k"], ids=["arrays", "maps"])
def test_msgpack_deep_nesting(level):
    refused(codec.unpackb, level * 10_000 + b"\xc0", match=r"nests deeper than 32 levels \(limit max_depth=32\)")


def test_msgpack_depth_limit_is_exact():
    assert codec.unpackb(b"\x91" * 31 + b"\x90") is not None  # 32 levels
    refused(codec.unpackb, b"\x91" * 32 + b"\x90", match="max_depth=32")


def test_msgpack_huge_string_value_and_key():
    text = "a" * (2 << 20)
    refused(codec.unpackb, msgpack.packb({"prompt": text}), match=r"string of 2097152 bytes \(limit max_str_bytes=1048576\)")
    refused(codec.unpackb, msgpack.packb({text: 1}), match="max_str_bytes=1048576")
    assert codec.unpackb(msgpack.packb({"prompt": "a" * (1 << 20)}))["prompt"] == "a" * (1 << 20)  # at the limit


def _ndarray(shape: Any, data: bytes = b"", dtype: Any = "<f4") -> bytes:
    return msgpack.packb({b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape})


@pytest.mark.parametrize(
    "payload, message",
    [
        (_ndarray([0, 1e30]), r"dimension 1e\+30 is not an integer"),
        (_ndarray([0, 2**64 - 1]), r"dimension 18446744073709551615 is out of range \(0 <= n < 2\*\*40\)"),
        (_ndarray([0, 2**63]), "out of range"),
        (_ndarray([2**40]), "out of range"),
        (_ndarray([-1]), "dimension -1 is out of range"),
        (_ndarray(["3"], b"\x00" * 12), "is not an integer"),
        (_ndarray([0, 2**39, 2**39, 2**39]), r"numpy array: shape \(0, 549755813888"),
        (_ndarray([1] * 33, b"\x00" * 4), r"33 dimensions \(limit max_ndim=32\)"),
        (_ndarray(7), "shape must be a list"),
        (_ndarray([2], b"\x00" * 8, [["a", "<f4"]]), "dtype must be a string"),
        (msgpack.packb({b"__npgeneric__": True, b"data": 2 * 10**9, b"dtype": "|V8"}), "void"),
        (msgpack.packb({b"__npgeneric__": True, b"data": [1.0] * 1000, b"dtype": "<f4"}), "malformed numpy scalar"),
    ],
    ids=["float-dim", "uint64-dim", "2**63", "2**40", "negative", "string-dim", "empty-but-too-big", "ndim", "not-a-list", "structured", "void-scalar", "list-scalar"],
)
def test_msgpack_bad_ndarray_headers(payload, message):
    refused(codec.unpackb, payload, match=message)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1\x00", r"byte 0xc1 at offset 0"),
        (b"\x92\x01", "truncated"),
        (b"\xc4\xff\x00", "truncated"),
        (b"\x01\x02", "1 bytes of extra data"),
        (b"", "truncated"),
    ],
)
def test_msgpack_malformed(payload, message):
    refused(codec.unpackb, payload, match="not valid msgpack: .*" + message)


def test_msgpack_limits_are_configurable():
    message = msgpack.packb({"values": list(range(150_000))})
    refused(codec.unpackb, message, match=ELEMENTS)
    assert codec.unpackb(message, DecodeLimits(max_elements=200_000))["values"][-1] == 149_999
    refused(codec.unpackb, codec.packb({"x": np.zeros((1,) * 5)}), DecodeLimits(max_ndim=4), match="max_ndim=4")
    refused(codec.unpackb, msgpack.packb({"k": "abcd"}), DecodeLimits(max_str_bytes=3), match="max_str_bytes=3")


def _typical_observation() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        **{f"observation.images.{cam}": rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for cam in ("front", "wrist", "top")},
        "observation.state": rng.standard_normal(14).astype(np.float32),
        "prompt": "pick up the red cube",
        "images": {"side": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)},
        "step": 12,
        "gain": np.float32(0.5),
        "flags": [1, "a", None, {"x": 1.5}],
    }


def test_msgpack_typical_observation_decodes_as_before():
    from openpi_client import msgpack_numpy as openpi_codec

    obs = _typical_observation()
    message = codec.packb(obs)
    ours = codec.unpackb(message, DEFAULT_LIMITS)
    theirs = openpi_codec.unpackb(message)
    assert ours.keys() == theirs.keys() == obs.keys()
    for key in ("observation.images.front", "observation.images.wrist", "observation.images.top", "observation.state"):
        np.testing.assert_array_equal(ours[key], obs[key])
        assert ours[key].dtype == obs[key].dtype and not ours[key].flags.owndata  # still a view onto the message
    np.testing.assert_array_equal(ours["images"]["side"], obs["images"]["side"])
    assert ours["prompt"] == "pick up the red cube" and ours["step"] == 12 and ours["flags"] == [1, "a", None, {"x": 1.5}]
    assert type(ours["gain"]) is np.float32 and ours["gain"] == np.float32(0.5)
    assert codec.unpackb(bytearray(message))["prompt"] == codec.unpackb(memoryview(message))["prompt"] == "pick up the red cube"


# -- protobuf -------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _observation_with_value(key: str, value: bytes) -> bytes:
    return _field(1, _field(1, key.encode()) + _field(2, value))


@functools.cache
def _packed_shape_bomb() -> bytes:
    tensor = _field(1, b"<f4") + _field(2, b"\x00" * 20_000_000) + _field(3, b"")
    return _observation_with_value("observation.state", _field(1, tensor))  # Value.tensor = 1


@functools.cache
def _deep_value_nesting(levels: int = 10_000) -> bytes:
    # Value{map: Fields{fields: {"a": Value{map: ...}}}}, built inside out without quadratic copying.
    core = b"\x21" + struct.pack("<d", 1.0)  # Value.number = 1.0
    heads: list[bytes] = []
    length = len(core)
    for _ in range(levels):
        entry = _field(1, b"a")
        entry_head = entry + _varint(2 << 3 | 2) + _varint(length)  # FieldsEntry: key, then value header
        entry_len = len(entry_head) + length
        fields_head = _varint(1 << 3 | 2) + _varint(entry_len)  # Fields.fields
        fields_len = len(fields_head) + entry_len
        value_head = _varint(5 << 3 | 2) + _varint(fields_len)  # Value.map
        heads.append(value_head + fields_head + entry_head)
        length += len(heads[-1])
    value = b"".join(reversed(heads)) + core
    return _observation_with_value("deep", value)


def _request_error(detail: str = "") -> str:
    return r"request is not a valid policylink\.v1\.Observation protobuf message \(.*" + detail


def test_protobuf_packed_shape_bomb():
    refused(convert.observation_from_bytes, _packed_shape_bomb(), match=r"policylink\.v1\.Tensor\.shape has more than 32 values \(limit max_ndim=32\)")


def test_protobuf_unpacked_shape_over_ndim():
    tensor = _field(1, b"<f4") + b"\x10\x01" * 33 + _field(3, b"\x00" * 4)
    refused(convert.observation_from_bytes, _observation_with_value("x", _field(1, tensor)), match="max_ndim=32")
    tensor = _field(1, b"<f4") + b"\x10\x01" * 32 + _field(3, b"\x00" * 4)
    assert convert.observation_from_bytes(_observation_with_value("x", _field(1, tensor)))["x"].shape == (1,) * 32


def test_protobuf_map_entry_bombs():
    match = r"more than 100000 fields and values \(limit max_elements=100000\)"
    refused(convert.observation_from_bytes, b"\x0a\x00" * 10_000_000, match="Observation message has " + match)
    refused(convert.parse_message, b"\x2a\x04\x0a\x00\x12\x00" * 3_000_000, pb.ConfigureRequest, match="ConfigureRequest message has " + match)


def test_protobuf_deep_value_nesting():
    refused(convert.observation_from_bytes, _deep_value_nesting(), match=r"nests deeper than 32 levels .*\(limit max_depth=32\)")


def test_parsed_observation_nested_too_deep_is_refused():
    message = pb.Observation()
    fields = message.fields
    for _ in range(40):
        fields = fields["a"].map.fields
    fields["x"].number = 1.0
    refused(convert.proto_to_observation, message, match=r"^a\.a\.a.*: values nest deeper than 32 levels \(limit max_depth=32\)")
    assert convert.proto_to_observation(message, DecodeLimits(max_depth=41))["a"]["a"]["a"] is not None


def test_parsed_tensor_with_too_many_or_too_large_dimensions():
    message = pb.Observation()
    message.fields["t"].tensor.CopyFrom(pb.Tensor(dtype="<f4", shape=[1] * 33, data=b"\x00" * 4))
    refused(convert.proto_to_observation, message, match=r"^t: shape has 33 dimensions \(limit max_ndim=32\)")
    message.fields["t"].tensor.CopyFrom(pb.Tensor(dtype="<f4", shape=[0, 2**62, 2**62], data=b""))
    refused(convert.proto_to_observation, message, match=r"^t: dimension 4611686018427387904 is out of range \(0 <= n < 2\*\*40\)")


def test_protobuf_huge_strings():
    match = r"string field policylink\.v1\..* is 2097152 bytes \(limit max_str_bytes=1048576\)"
    refused(convert.observation_from_bytes, _observation_with_value("prompt", _field(3, b"a" * (2 << 20))), match=match)
    refused(convert.observation_from_bytes, _field(1, _field(1, b"k" * (2 << 20))), match=match)


@pytest.mark.parametrize(
    "payload, detail",
    [
        (b"\xff\xff\xff\xff garbage, not protobuf", "field number"),
        (b"\x10\xff\xff", "truncated varint at byte 1"),
        (b"\x10" + b"\xff" * 11, "varint longer than 10 bytes"),
        (b"\x0a\x05\x0a\x01", "claims 5 bytes"),
        (b"\x0f", "invalid wire type 7"),
        (b"\x0b\x0c", "groups are not supported"),
        (b"\x08\x01", r"field policylink\.v1\.Observation\.fields sent with wire type 0, expected 2"),
        (b"\x0a\x04\x12\x02\x21\x00", "the last field runs 7 bytes past the end"),
    ],
    ids=["garbage", "truncated-varint", "long-varint", "length-past-end", "wire-type-7", "group", "wrong-wire-type", "fixed64-past-end"],
)
def test_protobuf_malformed(payload, detail):
    refused(convert.observation_from_bytes, payload, match=_request_error(detail))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, for mutated dtype strings such as "a4"
def test_protobuf_truncated_and_mutated_observations_only_raise_protocol_error():
    message = convert.observation_to_proto(_small_observation(), step=3, jpeg_quality=90).SerializeToString()
    for cut in range(1, len(message), 7):
        with pytest.raises(ProtocolError, match="request is not a valid"):
            convert.observation_from_bytes(message[:cut])
    rng = random.Random(0)
    for _ in range(3000):
        mutated = bytearray(message)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            convert.observation_from_bytes(bytes(mutated))
        except ProtocolError:
            pass


def test_protobuf_invalid_utf8_is_a_decode_error():
    refused(convert.observation_from_bytes, _observation_with_value("p", _field(3, b"\xff\xfe")), match=_request_error())


def _small_observation() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "observation.images.front": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
        "observation.state": np.arange(14, dtype=np.float32),
        "task": "stack the blocks",
        "gain": 0.25,
        "images": {"wrist": {"left": np.ones((2, 3), np.int64)}},
    }


def _assert_same(decoded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert decoded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_same(decoded[key], value)
        elif isinstance(value, np.ndarray):
            assert decoded[key].dtype == value.dtype
            np.testing.assert_array_equal(decoded[key], value)
        else:
            assert decoded[key] == value


def test_protobuf_typical_observations_decode_as_before():
    obs = _typical_observation()
    del obs["flags"], obs["gain"]  # not representable in policylink.v1
    obs["step"] = 12.0
    data = convert.observation_to_proto(obs, step=7).SerializeToString()
    decoded = convert.observation_from_bytes(data)
    _assert_same(decoded, obs)
    _assert_same(convert.proto_to_observation(pb.Observation.FromString(data)), obs)
    assert convert.observation_message(data).step == 7


def test_protobuf_jpeg_frames_decode_as_pillow_does():
    obs = _small_observation()
    data = convert.observation_to_proto(obs, jpeg_quality=90).SerializeToString()
    decoded = convert.observation_from_bytes(data)
    jpeg = pb.Observation.FromString(data).fields["observation.images.front"].jpeg
    np.testing.assert_array_equal(decoded["observation.images.front"], np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    _assert_same({k: v for k, v in decoded.items() if k != "observation.images.front"}, {k: v for k, v in obs.items() if k != "observation.images.front"})


@pytest.mark.parametrize("message_class", [pb.Observation, pb.ConfigureRequest, pb.Metadata, pb.ActionChunk, pb.FeatureSpec, pb.MetadataRequest, pb.ResetRequest])
def test_check_wire_accepts_real_messages(message_class):
    from policylink.proto.wire_limits import check_wire

    examples = {
        pb.Observation: convert.observation_to_proto(_small_observation(), step=-5, jpeg_quality=80),
        pb.ConfigureRequest: pb.ConfigureRequest(policy_path="/models/act", device="cuda:0", prompt="go", rename_map={"a": "b", "c": "d"}, fps=30.0),
        pb.Metadata: pb.Metadata(status="ready", model_id="m", action_dim=6, horizon=50, fps=30.0, input_features={"s": pb.FeatureSpec(shape=[6], dtype="float32")}, camera_names=["front", "wrist"]),
        pb.ActionChunk: convert.chunk_to_proto({"actions": np.ones((50, 6), np.float32), "server_timing": {"infer_ms": 3.5}}, step=9),
        pb.FeatureSpec: pb.FeatureSpec(shape=[-1, 3, 2**40], dtype="uint8"),
        pb.MetadataRequest: pb.MetadataRequest(),
        pb.ResetRequest: pb.ResetRequest(),
    }
    data = examples[message_class].SerializeToString()
    check_wire(data, message_class.DESCRIPTOR, DEFAULT_LIMITS)
    check_wire(memoryview(data), message_class.DESCRIPTOR)
    assert convert.parse_message(data, message_class) == examples[message_class]
    # An unknown field (a newer client) is skipped, not refused.
    check_wire(data + _field(1000, b"future") + b"\xc0\x3e\x05", message_class.DESCRIPTOR, DEFAULT_LIMITS)  # field 1000 (bytes, then varint): defined nowhere


def test_check_wire_is_fast_for_camera_observations():
    from policylink.proto.wire_limits import check_wire

    data = convert.observation_to_proto(_typical_observation() | {"flags": "x", "gain": 0.5}).SerializeToString()
    timings = []
    for _ in range(200):
        started = time.perf_counter()
        check_wire(data, pb.Observation.DESCRIPTOR, DEFAULT_LIMITS)
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[100] < 0.5e-3


# -- images ---------------------------------------------------------------------

PIXELS = r"image of {w}x{h} pixels exceeds the 16777216-pixel limit"


def _encoded(fmt: str, size: tuple[int, int] = (16, 16), mode: str = "RGB", **options: Any) -> bytes:
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _jpeg_claiming(width: int, height: int, **options: Any) -> bytes:
    data = bytearray(_encoded("JPEG", **options))
    sof = min(data.find(marker) for marker in (b"\xff\xc0", b"\xff\xc2") if data.find(marker) >= 0)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@functools.cache
def _png_bomb() -> bytes:
    # A real 9000x9000 grey PNG of zeros: 81 Mpx (under Pillow's own 89 Mpx
    # warning) in about 80 KB; decoding it would take 81 MB, 243 MB as RGB.
    width = height = 9000
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(20000, 20000), (8000, 8000), (65535, 257)])
def test_jpeg_claiming_too_many_pixels(width, height):
    data = _jpeg_claiming(width, height)
    refused(media.decode_image, data, DEFAULT_LIMITS.max_image_pixels, match=PIXELS.format(w=width, h=height))
    refused(media.decode_image, _jpeg_claiming(width, height, progressive=True), 16 * 2**20, match=PIXELS.format(w=width, h=height))
    message = _observation_with_value("observation.images.front", _field(2, data))  # Value.jpeg = 2
    refused(
        convert.observation_from_bytes, message,
        match=r"^observation\.images\.front: " + PIXELS.format(w=width, h=height) + r" \(max_image_pixels\)",
    )


def test_jpeg_with_an_empty_side_or_two_frame_headers():
    refused(media.decode_image, _jpeg_claiming(0, 16), 10**6, match="image of 0x16 pixels has an empty side")
    data = _encoded("JPEG")
    sof = data.find(b"\xff\xc0")
    length = struct.unpack(">H", data[sof + 2 : sof + 4])[0]
    twice = data[: sof + 2 + length] + data[sof : sof + 2 + length] + data[sof + 2 + length :]
    refused(media.decode_image, twice, 10**6, match="more than one frame header")


def test_png_bomb():
    data = _png_bomb()
    assert len(data) < 200_000
    refused(media.decode_image, data, DEFAULT_LIMITS.max_image_pixels, match=PIXELS.format(w=9000, h=9000))
    refused(
        convert.observation_from_bytes, _observation_with_value("observation.images.front", _field(2, data)),
        match=r"^observation\.images\.front: .*image format PNG is not accepted \(accepted: JPEG\)",
    )


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_other_formats_are_refused(fmt):
    data = _encoded(fmt)
    refused(media.decode_image, data, 10**6, match=rf"image format {fmt} is not accepted \(accepted: JPEG, PNG\)")
    refused(media.decode_image, data, 10**6, ("JPEG",), match=rf"image format {fmt} is not accepted \(accepted: JPEG\)")
    message = _observation_with_value("observation.images.front", _field(2, data))
    refused(convert.observation_from_bytes, message, match=rf"^observation\.images\.front: .*image format {fmt} is not accepted")


def test_corrupt_images_are_decode_errors():
    jpeg = _encoded("JPEG")
    for data, match in [
        (b"", "image format unknown"),
        (jpeg[:20], "not a decodable JPEG image"),
        (jpeg[: len(jpeg) // 2], "not a decodable JPEG image"),
        (_encoded("PNG")[:30], "not a decodable PNG image"),
    ]:
        message = refused(media.decode_image, data, 10**6, match=match, error=media.ImageDecodeError)
        assert isinstance(media.ImageDecodeError(message), ValueError)


def test_pillow_decompression_bomb_limit_becomes_our_error(monkeypatch):
    monkeypatch.setattr(media, "_jpeg_backend", media._backend)  # JPEG through Pillow even where simplejpeg is installed
    refused(media.decode_image, _jpeg_claiming(20000, 20000), 10**9, match=r"exceeds Pillow's \d+-pixel decompression-bomb limit", error=media.ImageTooLarge)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    refused(media.decode_image, _encoded("PNG"), 10**6, match="image of 16x16 pixels exceeds Pillow's 100-pixel decompression-bomb limit")


@pytest.mark.parametrize(
    "fmt, mode, options",
    [("JPEG", "RGB", {"quality": 90}), ("JPEG", "L", {}), ("JPEG", "RGB", {"progressive": True}), ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "L", {})],
)
def test_real_frames_decode_like_pillow(fmt, mode, options):
    data = _encoded(fmt, (640, 480), mode, **options)
    assert media.image_header(data) == (fmt, 640, 480)
    decoded = media.decode_image(data, DEFAULT_LIMITS.max_image_pixels)
    assert decoded.shape == (480, 640, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    media.decode_image(data, 640 * 480)  # exactly at the limit
    refused(media.decode_image, data, 640 * 480 - 1, match="image of 640x480 pixels exceeds the 307199-pixel limit", error=media.ImageTooLarge)


def test_opencv_fallback_checks_the_header_before_decoding(monkeypatch):
    calls = []

    class FakeCv2:  # decodes with Pillow, answers in BGR as OpenCV does
        IMREAD_COLOR = 1

        @staticmethod
        def imdecode(buffer, flags):
            calls.append(len(buffer))
            return np.asarray(Image.open(io.BytesIO(buffer.tobytes())).convert("RGB"))[..., ::-1]

    monkeypatch.setattr(media, "_backend", lambda: ("opencv", FakeCv2))
    refused(media.decode_image, _jpeg_claiming(20000, 20000), 16 * 2**20, match=PIXELS.format(w=20000, h=20000))
    refused(media.decode_image, _png_bomb(), 16 * 2**20, match=PIXELS.format(w=9000, h=9000))
    refused(media.decode_image, _encoded("GIF"), 16 * 2**20, match="image format GIF is not accepted")
    assert calls == []
    data = _encoded("PNG", (64, 48))
    np.testing.assert_array_equal(media.decode_image(data, 10**6), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert calls == [len(data)]


def test_simplejpeg_path_checks_the_header_before_decoding_and_names_corrupt_data(monkeypatch):
    calls = []

    class FakeSimplejpeg:  # records calls, decodes with Pillow
        @staticmethod
        def decode_jpeg(data, colorspace, strict):
            calls.append((len(data), colorspace, strict))
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    monkeypatch.setattr(media, "_jpeg_backend", lambda: ("simplejpeg", FakeSimplejpeg))
    refused(media.decode_image, _jpeg_claiming(20000, 20000), 16 * 2**20, match=PIXELS.format(w=20000, h=20000))
    assert calls == []
    data = _encoded("JPEG", (64, 48), quality=90)
    np.testing.assert_array_equal(media.decode_image(data, 10**6), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert calls == [(len(data), "RGB", True)]  # strict: libjpeg's warnings (a damaged stream) are errors


def test_real_simplejpeg_refuses_a_truncated_stream_by_name():
    pytest.importorskip("simplejpeg")
    data = _encoded("JPEG", (640, 480), quality=90)
    assert media._jpeg_backend()[0] == "simplejpeg"
    refused(media.decode_image, data[: len(data) // 2], 10**6, match="not a decodable JPEG image")


def test_decode_image_arguments():
    with pytest.raises(ValueError, match="formats"):
        media.decode_image(_encoded("GIF"), 10**6, ("GIF",))
    with pytest.raises(ValueError, match="max_pixels"):
        media.decode_image(_encoded("PNG"), 0)


def test_decode_limits_defaults_and_validation():
    assert DEFAULT_LIMITS == DecodeLimits(max_elements=100_000, max_depth=32, max_str_bytes=1 << 20, max_ndim=32, max_image_pixels=16 * 2**20)
    with pytest.raises(ValueError, match="max_depth"):
        DecodeLimits(max_depth=0)
    with pytest.raises(ValueError, match="max_elements"):
        DecodeLimits(max_elements=True)
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_depth = 64  # type: ignore[misc]


@pytest.mark.parametrize("spec", [",4", "f4,f4", "(2,)f4", "[('a','<f4')]", "<f4" * 50, "not-a-dtype", b"\xff\xfe"])
def test_dtype_strings_numpy_cannot_read_or_that_name_structures_are_bad_requests(spec):
    with pytest.raises(ProtocolError, match="unknown dtype"):
        codec.unpackb(_ndarray([0], b"", spec))
    message = pb.Observation()
    message.fields["t"].tensor.CopyFrom(pb.Tensor(dtype=spec if isinstance(spec, str) else "x", shape=[0], data=b""))
    with pytest.raises(ProtocolError, match="unknown dtype"):
        convert.proto_to_observation(message)


# -- where a message is decoded: on the event loop only when that is sure to be cheap


def _ordinary_observation() -> dict:
    return {
        "observation.state": np.arange(14, dtype=np.float32),
        "observation.images.top": np.full((480, 640, 3), 7, np.uint8),
        "task": "pick the cube",
    }


def test_quick_decode_takes_an_ordinary_observation() -> None:
    request = Request.quick_from_msgpack(packb({**_ordinary_observation(), "__timeout_ms__": 500}))
    assert request is not None and request.command is None and request.timeout_s == 0.5
    assert request.fields["task"] == "pick the cube"
    assert np.array_equal(request.fields["observation.state"], np.arange(14, dtype=np.float32))
    assert request.fields["observation.images.top"].shape == (480, 640, 3)


@pytest.mark.parametrize(
    "message",
    [
        packb({"values": list(range(300))}),  # more values than the quick budget
        packb({"image": np.zeros(5 * 2**20, np.uint8)}),  # more bytes than the quick budget
        b"\x81\xa1a\xc1",  # broken: the decode thread names the problem
    ],
    ids=["many-values", "large", "broken"],
)
def test_quick_decode_leaves_costly_or_broken_messages_to_the_decode_threads(message: bytes) -> None:
    assert Request.quick_from_msgpack(message) is None


def test_quick_decode_leaves_compressed_images_to_the_decode_threads() -> None:
    pytest.importorskip("simplejpeg")
    compressed = compress_images(_ordinary_observation(), quality=90)
    assert Request.quick_from_msgpack(packb(compressed)) is None


def test_the_engine_decodes_on_the_loop_only_what_quick_decode_takes() -> None:
    threads: list[str] = []

    def decode(payload: bytes) -> Request:
        threads.append(threading.current_thread().name)
        return Request.from_map(unpackb(payload))

    def quick(payload: bytes) -> Request | None:
        request = Request.quick_from_msgpack(payload)
        if request is not None:
            threads.append(threading.current_thread().name)
        return request

    async def main() -> list[str]:
        engine = Engine(EchoPolicy(action_dim=2))
        session = engine.open_session()
        try:
            ordinary = await engine.handle(session, packb({"observation.state": np.zeros(2, np.float32)}), decode, quick_decode=quick)
            many = await engine.handle(session, packb({"observation.state": np.zeros(2, np.float32), "extra": list(range(300))}), decode, quick_decode=quick)
            broken = await engine.handle(session, b"\x81\xa1a\xc1", decode, quick_decode=quick)
        finally:
            await engine.aclose()
        assert ordinary.failure is None and many.failure is None
        assert broken.failure is not None and "0xc1" in broken.failure.message
        return threads

    loop_thread = threading.current_thread().name
    threads = asyncio.run(main())
    assert threads[0] == loop_thread
    assert threads[1].startswith("policylink-decode") and threads[2].startswith("policylink-decode")
