"""The restricted unpickler refuses allocation and CPU bombs quickly, and still admits real payloads.

Every bomb here was admitted, crashed the process or stalled it with the
previous (C unpickler) version, so each bomb test fails against it; the
round-trip tests at the end guard the payloads that must keep working.
"""

from __future__ import annotations

import collections
import copyreg
import gc
import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

from policylink.errors import ProtocolError
from policylink.server import safe_pickle
from policylink.server.safe_pickle import UnsafePickle, loads

torch = pytest.importorskip("torch")

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _refused(payload: bytes, match: str, **limits):
    """Loads ``payload``; it must be refused within 0.1 s, the process growing by less than 50 MB."""
    safe_pickle.prepare()
    gc.collect()
    before = _rss()
    started = time.perf_counter()
    with pytest.raises(UnsafePickle, match=match) as info:
        loads(payload, **limits)
    elapsed = time.perf_counter() - started
    grown = _rss() - before
    assert elapsed < 0.1, f"refused after {elapsed:.3f} s"
    assert grown < 50 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB"
    return info.value


class Call:
    """Pickles as ``func(*args)`` (REDUCE), optionally followed by BUILD with ``state``."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _long(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(data)) + data  # LONG4


# --------------------------------------------------------------------------- bombs through admitted callables

ELEMENTS = r"limit max_elements=1000000\)"
BYTES = r"limit max_bytes=67108864\)"


@pytest.mark.parametrize(
    ("bomb", "match"),
    [
        (Call(list, Call(range, 25_000_000)), r"refusing builtins\.list of 25000000 elements \(" + ELEMENTS),
        (Call(tuple, Call(range, 25_000_000)), r"builtins\.tuple of 25000000 elements \(" + ELEMENTS),
        (Call(set, Call(range, 25_000_000)), r"builtins\.set of 25000000 elements \(" + ELEMENTS),
        (Call(frozenset, Call(range, 25_000_000)), r"builtins\.frozenset of 25000000 elements \(" + ELEMENTS),
        (Call(bytes, 10**9), r"builtins\.bytes of 1000000000 bytes \(" + BYTES),
        (Call(bytearray, 10**9), r"builtins\.bytearray of 1000000000 bytes \(" + BYTES),
        (Call(bytes, Call(range, 25_000_000)), r"builtins\.bytes of 25000000 elements \(" + ELEMENTS),
        (Call(copyreg._reconstructor, list, list, Call(range, 25_000_000)), r"copyreg\._reconstructor on builtins\.list of 25000000 elements \(" + ELEMENTS),
        (Call(collections.OrderedDict, Call(list, Call(range, 25_000_000))), r"builtins\.list of 25000000 elements"),
        (Call(list, Call(range, 10**30)), r"builtins\.list of 10{30} elements \(" + ELEMENTS),
        (Call(int, "9" * 10**6), r"builtins\.int of a 1000000-character string \(limit 4300 digits\)"),
        (Call(int, "f" * 10**6, 16), r"builtins\.int of a 1000000-character string \(limit 4300 digits\)"),  # power-of-two bases skip Python's own limit
        (Call(float, "1" * 10**6), r"builtins\.float of a 1000000-character string \(limit 4300 digits\)"),
        (Call(str, Call(bytes, 10**7)), r"builtins\.str of a bytes"),  # its repr: 4x the size
        (Call(str, b"x" * 100, "cp1252"), r"encoding 'cp1252'"),  # would import encodings.cp1252 inside the request
    ],
    ids=["list-range", "tuple", "set", "frozenset", "bytes", "bytearray", "bytes-range", "reconstructor", "ordereddict", "huge-range", "int", "int-hex", "float", "str-repr", "codec"],
)
def test_bombs_through_admitted_callables_are_refused_before_the_call(bomb, match):
    _refused(pickle.dumps(bomb, protocol=4), match)


def test_the_61_byte_list_of_range_pickle_is_refused():
    payload = b"\x80\x04" + _global("builtins", "list") + _global("builtins", "range") + b"J" + struct.pack("<i", 25_000_000) + b"\x85R\x85R."
    error = _refused(payload, r"refusing builtins\.list of 25000000 elements \(limit max_elements=1000000\)")
    assert isinstance(error, ProtocolError)


def test_str_of_a_huge_int_is_refused():
    payload = b"\x80\x04" + _global("builtins", "str") + _long(1 << (8 * 2**20)) + b"\x85R."
    _refused(payload, r"builtins\.str of an int of about \d+ digits \(limit 4300 digits\)")


def test_limits_are_parameters_and_the_element_budget_is_shared_by_all_calls():
    pairs = [(i, i) for i in range(2000)]
    _refused(pickle.dumps(Call(dict, pairs)), r"builtins\.dict of 2000 elements \(limit max_elements=1000\)", max_elements=1000)
    _refused(pickle.dumps(Call(collections.OrderedDict, pairs)), r"collections\.OrderedDict of 2000 elements", max_elements=1000)
    # Two calls of 600 elements: the second exceeds what is left.
    _refused(pickle.dumps([Call(list, Call(range, 600)), Call(list, Call(range, 600))]), r"builtins\.list of 600 elements after 600 already built \(limit max_elements=1000\)", max_elements=1000)
    _refused(pickle.dumps(Call(bytes, 5000)), r"builtins\.bytes of 5000 bytes \(limit max_bytes=4096\)", max_bytes=4096)
    assert loads(pickle.dumps(Call(bytes, 5000)), max_bytes=8192) == bytes(5000)
    with pytest.raises(ValueError, match="max_ops"):
        loads(pickle.dumps(1), max_ops=0)


# --------------------------------------------------------------------------- numpy


def test_numpy_reconstruct_with_a_hostile_shape_is_refused():
    bomb = Call(_MULTIARRAY._reconstruct, np.ndarray, (40_000, 50_000), b"b")
    _refused(pickle.dumps(bomb), r"_reconstruct of 2000000000 bytes \(limit max_bytes=67108864\)")
    _refused(pickle.dumps(Call(_MULTIARRAY._reconstruct, np.ndarray, (1,) * 40, b"b")), r"of 40 dimensions \(limit 32\)")


def test_numpy_setstate_with_a_shape_its_data_does_not_fill_is_refused():
    bomb = Call(_MULTIARRAY._reconstruct, np.ndarray, (0,), b"b", state=(1, (100_000, 100_000), np.dtype("u1"), False, b"x"))
    _refused(pickle.dumps(bomb), r"ndarray\.__setstate__ of 10000000000 bytes \(limit max_bytes=67108864\)")
    small = Call(_MULTIARRAY._reconstruct, np.ndarray, (0,), b"b", state=(1, (10,), np.dtype("u1"), False, b"x"))
    _refused(pickle.dumps(small), r"needs 10 bytes, got 1 bytes")


def test_object_array_with_fewer_items_than_its_shape_is_refused_not_a_segfault():
    """numpy's ndarray.__setstate__ reads past the item list: the old unpickler crashed the server."""
    script = textwrap.dedent(
        """
        import pickle, numpy as np
        from policylink.server.safe_pickle import loads, UnsafePickle
        mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
        class Bomb:
            def __reduce__(self):
                return (mod._reconstruct, (np.ndarray, (0,), b"b"), (1, (100000,), np.dtype("O"), False, [1]))
        try:
            loads(pickle.dumps(Bomb()))
        except UnsafePickle as exc:
            print("refused:", exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"crashed with {result.returncode}: {result.stderr[-2000:]}"
    assert "refused: refusing numpy.ndarray.__setstate__: an object array of shape (100000,) needs a list of 100000 items" in result.stdout


def test_numpy_scalar_of_a_huge_void_dtype_is_refused():
    bomb = Call(_MULTIARRAY.scalar, np.dtype("V100000000"))
    _refused(pickle.dumps(bomb), r"scalar of 100000000 bytes \(limit max_bytes=67108864\)")


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ((3, "|", None, ("a",), {"a": (np.dtype("<f8"), 4096)}, 8, 1, 0), r"field 'a' at offset 4096 overruns the 8-byte item"),  # out-of-bounds reads
        ((3, "|", None, None, None, 8, 1, 0x01 | 0x08 | 0x10), r"changes a \|V8 dtype's flags from 0 to 25"),  # raw bytes used as object pointers
        ((3, "|", None, ("a",), {"a": (np.dtype("<f8"), 0)}, 8, 1, 0x01), r"object and pointer items are not admitted"),
        ((3, "|", None, None, None, 10**9, 1, 0), r"resizes a 8-byte item to 1000000000 bytes"),
    ],
    ids=["field-offset", "hasobject-flag", "struct-refcount-flag", "elsize"],
)
def test_dtype_setstate_that_breaks_memory_safety_is_refused(state, match):
    _refused(pickle.dumps(Call(np.dtype, "V8", False, True, state=state)), match)


def test_object_dtype_flags_cannot_be_cleared():
    """An object dtype without its REFCOUNT flag would let arrays hold objects they do not own."""
    _refused(pickle.dumps(Call(np.dtype, "O8", False, True, state=(3, "|", None, None, None, -1, -1, 0))), r"changes a object dtype's flags from 63 to 0")


def test_a_build_cannot_rewrite_numpy_s_shared_dtype():
    """numpy.dtype(..., copy=False) returns numpy's own uint8 dtype; a BUILD on it would change it for everyone."""
    value = loads(pickle.dumps(Call(np.dtype, "u1", False, False, state=(3, "|", None, None, None, -1, -1, 0))))
    assert value == np.dtype("u1") and value is not np.dtype("u1")


# --------------------------------------------------------------------------- torch


def _storage(n: int = 1):
    return torch.storage.TypedStorage(wrap_storage=torch.ones(n).untyped_storage(), dtype=torch.float32, _internal=True)


def _storage_stream(numel: int, raw: bytes, location: str = "cpu") -> bytes:
    """torch.save's legacy stream for one float storage, with the element count and location it claims."""
    sentinel = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", location, numel, None) if obj is sentinel else None

    main = io.BytesIO()
    Pickler(main, protocol=2).dump(sentinel)
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2), pickle.dumps(sys_info, protocol=2), main.getvalue(), pickle.dumps(["0"], protocol=2)]
    return b"".join(parts) + struct.pack("<q", numel) + raw


def test_a_storage_stream_claiming_more_elements_than_it_holds_is_refused_before_allocating():
    stream = _storage_stream(10**10, struct.pack("<f", 1.0))
    _refused(pickle.dumps(Call(torch.storage._load_from_bytes, stream)), r"the storage claims 40000000000 bytes but only 4 follow")


def test_a_storage_stream_naming_a_device_is_rebuilt_on_the_cpu():
    stream = _storage_stream(2, struct.pack("<2f", 1.0, 2.0), location="cuda:0")
    tensor = loads(pickle.dumps(Call(torch._utils._rebuild_tensor_v2, Call(torch.storage._load_from_bytes, stream), 0, (2,), (1,), False, collections.OrderedDict())))
    assert tensor.device.type == "cpu" and tensor.tolist() == [1.0, 2.0]


def test_a_tensor_view_claiming_far_more_than_its_storage_is_refused():
    bomb = Call(torch._utils._rebuild_tensor_v2, _storage(1), 0, (10**6, 10**6), (0, 0), False, collections.OrderedDict())
    _refused(pickle.dumps(bomb), r"_rebuild_tensor_v2 of size \(1000000, 1000000\): 4000000000000 bytes \(limit max_bytes=67108864\)")
    past_the_end = Call(torch._utils._rebuild_tensor_v2, _storage(1), 0, (1000,), (1,), False, collections.OrderedDict())
    _refused(pickle.dumps(past_the_end), r"it reaches element 999 of a storage of 1")


# --------------------------------------------------------------------------- what the pickle machine builds by itself


@pytest.mark.parametrize(
    "body",
    [
        b"]\x94(" + b"N" + b"2" * 2_000_000 + b"e",  # DUP: 1 byte per list slot
        b"]\x94(" + b"\x8f" * 1_000_000 + b"e",  # EMPTY_SET: 1 byte per 216-byte set
        b"]\x94(" + b"h\x00" * 1_000_000 + b"e",  # BINGET of the list itself: extending it with references
        b"(" * 1_000_000,  # MARK: a new stack list each
    ],
    ids=["dup", "empty-set", "binget", "mark"],
)
def test_opcode_bombs_stop_at_the_opcode_budget(body):
    _refused(b"\x80\x04" + body + b".", r"more than 100000 opcodes to build \(limit max_ops=100000\)")


def test_a_huge_memo_index_costs_nothing():
    """The C unpickler sizes its memo array by the index: this 7-byte pickle stalled it for ~2 s."""
    payload = b"\x80\x04N" + b"r" + struct.pack("<I", 100_000_000) + b"."
    before, started = _rss(), time.perf_counter()
    assert loads(payload) is None
    assert time.perf_counter() - started < 0.1 and _rss() - before < 50 * 2**20


def test_a_bytearray8_longer_than_the_payload_is_refused():
    _refused(b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".", r"BYTEARRAY8 of 1099511627776 bytes in a payload of 12")


def test_hashing_a_shared_tuple_dag_is_refused():
    """Tuples do not cache their hash: 24 levels of (t, t) take 2**24 steps to hash, 60 levels forever."""
    body = b"NN\x86\x94" + b"".join(b"h" + bytes([k]) + b"h" + bytes([k]) + b"\x86\x94" for k in range(24))
    payload = b"\x80\x04" + body + b"\x8f(h" + bytes([24]) + b"\x90."
    _refused(payload, r"a tuple of more than 64 items as a dict key or set element")


def test_big_ints_as_set_elements_are_refused():
    """hash(n) is n mod 2**61-1: multiples of it all collide, and hashing a big int is linear in its size."""
    prime = (1 << 61) - 1
    payload = b"\x80\x04\x8f(" + b"".join(_long(k * prime) for k in range(1, 10_001)) + b"\x90."
    _refused(payload, r"an int of \d+ bits as a dict key or set element \(limit 64 bits\)")


def _colliding_pairs(count: int) -> list[tuple[int, int]]:
    """Distinct (a, b) tuples of small ints sharing one hash (CPython's tuple hash is invertible)."""
    mask = (1 << 64) - 1
    p1, p2, p5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
    inv_p1, inv_p2 = pow(p1, -1, 1 << 64), pow(p2, -1, 1 << 64)

    def rotl(x):
        return ((x << 31) | (x >> 33)) & mask

    def rotr(x):
        return ((x >> 31) | (x << 33)) & mask

    target = hash((1, 2)) & mask
    acc2 = (target - (2 ^ (p5 ^ 3527539))) & mask
    pairs, a = [], 0
    while len(pairs) < count:
        a += 1
        acc1 = (rotl((p5 + (hash(a) & mask) * p2) & mask) * p1) & mask
        lane = ((rotr((acc2 * inv_p1) & mask) - acc1) * inv_p2) & mask
        signed = lane - (1 << 64) if lane >> 63 else lane
        if (0 <= signed < (1 << 61) - 1 or -((1 << 61) - 1) < signed < -2) and hash(signed) == signed and (a, signed) != (1, 2):
            pairs.append((a, signed))
    return pairs


def test_hash_flooding_a_dict_is_refused():
    pairs = _colliding_pairs(3000)
    if len({hash(pair) for pair in pairs}) != 1:
        pytest.skip("this Python's tuple hash is not the one the collisions were computed for")
    payload = pickle.dumps(dict.fromkeys(pairs, 0), protocol=4)
    _refused(payload, r"more than 16 distinct keys of one hash value")
    _refused(pickle.dumps(Call(set, pairs)), r"more than 16 distinct keys of one hash value")


# --------------------------------------------------------------------------- objects only this pickle created are filled in


def test_a_build_cannot_rewrite_a_lerobot_enum_member():
    lerobot_types = pytest.importorskip("lerobot.configs.types")
    bomb = Call(lerobot_types.FeatureType, "STATE", state={"_policylink_marker": 1})
    try:
        _refused(pickle.dumps(bomb), r"refusing to fill in .*FeatureType.*: BUILD only fills objects this pickle created")
        assert "_policylink_marker" not in vars(lerobot_types.FeatureType.STATE)
    finally:
        vars(lerobot_types.FeatureType.STATE).pop("_policylink_marker", None)


def test_a_build_cannot_set_attributes_of_an_admitted_class():
    lerobot_types = pytest.importorskip("lerobot.configs.types")
    name = b"_policylink_cls"
    state = b"N}" + b"\x8c" + bytes([len(name)]) + name + b"K\x01s\x86"  # (None, {name: 1}): attributes set with setattr
    payload = b"\x80\x04" + _global("lerobot.configs.types", "PolicyFeature") + state + b"b."
    try:
        _refused(payload, r"refusing to fill in .*PolicyFeature: BUILD only fills objects this pickle created")
        assert not hasattr(lerobot_types.PolicyFeature, "_policylink_cls")
    finally:
        if hasattr(lerobot_types.PolicyFeature, "_policylink_cls"):
            delattr(lerobot_types.PolicyFeature, "_policylink_cls")


# --------------------------------------------------------------------------- imports happen in prepare(), never in a request


def test_prepare_makes_a_torch_tensor_unpickle_import_nothing():
    script = textwrap.dedent(
        """
        import pickle, sys
        from policylink.server import safe_pickle
        safe_pickle.prepare()
        safe_pickle.prepare()  # idempotent
        import torch
        payload = pickle.dumps({"t": torch.ones(2, 3), "u8": torch.zeros(4, dtype=torch.uint8), "p": torch.nn.Parameter(torch.ones(1))})
        before = set(sys.modules)
        value = safe_pickle.loads(payload)
        assert torch.equal(value["t"], torch.ones(2, 3))
        print("new modules:", sorted(set(sys.modules) - before))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "new modules: []" in result.stdout, result.stdout


def test_a_global_whose_module_prepare_did_not_load_is_refused_not_imported(monkeypatch):
    safe_pickle.prepare()
    monkeypatch.delitem(safe_pickle._RESOLVED, ("collections", "OrderedDict"))
    before = set(sys.modules)
    with pytest.raises(UnsafePickle, match=r"refusing to unpickle collections\.OrderedDict: this server lacks it"):
        loads(pickle.dumps(collections.OrderedDict(a=1)))
    assert set(sys.modules) == before


# --------------------------------------------------------------------------- real payloads still load


def test_camera_observations_round_trip():
    lerobot = pytest.importorskip("lerobot.async_inference.helpers")
    rng = np.random.default_rng(0)
    images = {f"observation.images.cam{i}": rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for i in range(3)}
    for convert in (lambda a: a, torch.from_numpy):
        observation = {key: convert(image) for key, image in images.items()} | {"observation.state": convert(np.arange(6, dtype=np.float32)), "task": "pick the cube"}
        back = loads(pickle.dumps(lerobot.TimedObservation(1.5, 7, observation, must_go=True)))
        assert isinstance(back, lerobot.TimedObservation) and back.timestep == 7 and back.must_go
        for key, image in images.items():
            assert np.array_equal(np.asarray(back.observation[key]), image)


def test_a_frame_at_the_image_limit_round_trips_with_the_default_limits():
    frame = np.random.default_rng(1).integers(0, 255, (4096, 4096, 3), dtype=np.uint8)  # 16 Mpx, 48 MiB
    assert np.array_equal(loads(pickle.dumps({"observation.images.front": frame}))["observation.images.front"], frame)
    big = torch.from_numpy(frame)
    assert torch.equal(loads(pickle.dumps(big)), big)


@pytest.mark.parametrize(
    "value",
    [
        np.zeros(3, dtype=[("a", "<f4"), ("b", "U3")]),
        np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "<f8")], align=True)),
        np.array([1, "a", None], dtype=object),
        np.array(["ab", "c"]),
        np.array(["2020-01-01"], dtype="M8[D]"),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.zeros((0, 5)),
        np.zeros(2, dtype=("f4", (2, 3))),
        np.float32(1.5),
        np.str_("abc"),
        np.datetime64("2020-01-01"),
    ],
    ids=["struct", "aligned", "object", "str", "datetime", "fortran", "empty", "subarray", "f32", "str_", "dt64"],
)
def test_numpy_values_round_trip(value):
    back = loads(pickle.dumps(value))
    assert type(back) is type(value) and back.dtype == value.dtype
    if isinstance(value, np.ndarray):
        assert back.shape == value.shape and back.tolist() == value.tolist() and back.flags.f_contiguous == value.flags.f_contiguous
    else:
        assert back == value


@pytest.mark.parametrize(
    "value",
    [
        torch.arange(6.0).reshape(2, 3),
        torch.arange(6.0).reshape(2, 3).t(),
        torch.arange(10.0)[2:7:2],
        torch.zeros(3, 4, dtype=torch.uint8),
        torch.ones(2, dtype=torch.bool),
        torch.ones(2, dtype=torch.bfloat16),
        torch.ones(2, dtype=torch.int16),
        torch.tensor(3.0),
        torch.zeros(0, 3),
        torch.ones(2).expand(3, 2),
        torch.nn.Parameter(torch.ones(2)),
    ],
    ids=["matrix", "transposed", "strided", "uint8", "bool", "bfloat16", "int16", "scalar", "empty", "expanded", "parameter"],
)
def test_torch_tensors_round_trip(value):
    back = loads(pickle.dumps(value))
    assert type(back) is type(value) and back.dtype == value.dtype and back.shape == value.shape and back.stride() == value.stride()
    assert torch.equal(back, value)


def test_containers_and_lerobot_objects_round_trip():
    lerobot_types = pytest.importorskip("lerobot.configs.types")
    helpers = pytest.importorskip("lerobot.async_inference.helpers")
    value = {
        "od": collections.OrderedDict(a=1, b=[2]),
        "dd": collections.defaultdict(list, a=[1]),
        "set": {1, 2, "x", 2.5},
        "frozenset": frozenset({"a", "b"}),
        "bytearray": bytearray(b"xy"),
        "tuple_keys": {(1, "x"): 1, (2, (3, None)): 2},
        "int_keys": {i: str(i) for i in range(1000)},
        "floats": [float(i) for i in range(50_000)],
        "misc": [1 + 2j, slice(1, 2), range(5), None, True, 10**100],
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "config": helpers.RemotePolicyConfig("act", "/ckpt", {"observation.state": lerobot_types.PolicyFeature(lerobot_types.FeatureType.STATE, (6,))}, 10),
        "actions": [helpers.TimedAction(0.0, 3, torch.arange(6.0))],
        "enums": [lerobot_types.FeatureType.VISUAL, lerobot_types.NormalizationMode.MEAN_STD],
    }
    for protocol in (3, 4, 5):
        back = loads(pickle.dumps(value, protocol=protocol))
        assert back["od"] == value["od"] and type(back["od"]) is collections.OrderedDict
        assert back["dd"] == value["dd"] and back["dd"].default_factory is list
        for key in ("set", "frozenset", "bytearray", "tuple_keys", "int_keys", "floats", "misc", "size", "device", "enums"):
            assert back[key] == value[key], key
        assert back["config"].lerobot_features["observation.state"].type is lerobot_types.FeatureType.STATE
        assert torch.equal(back["actions"][0].action, torch.arange(6.0))


@pytest.fixture
def legacy_class(monkeypatch):
    """A legacy client's class, in a module the server does not have."""
    module = types.ModuleType("robot_client")

    class LegacyObservation:
        def __init__(self):
            self.state = [0.0, 1.0, 2.0]
            self.names = ["a", "b"]

    LegacyObservation.__module__ = module.__name__
    LegacyObservation.__qualname__ = "LegacyObservation"
    module.LegacyObservation = LegacyObservation
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return LegacyObservation


@pytest.mark.parametrize("protocol", [0, 1, 2, 4])
def test_legacy_records_round_trip(legacy_class, protocol):
    payload = pickle.dumps(legacy_class(), protocol=protocol)
    record = loads(payload, records=("robot_client:LegacyObservation",))
    assert isinstance(record, safe_pickle.Record) and record.names == ["a", "b"] and record.state == [0.0, 1.0, 2.0]


def test_python2_names_are_mapped():
    assert loads(pickle.dumps({1, 2}, protocol=2)) == {1, 2}  # __builtin__.set


def test_the_old_signature_still_works():
    checked = []
    assert loads(pickle.dumps([1]), (), checked.append) == [1] and checked == [[1]]
