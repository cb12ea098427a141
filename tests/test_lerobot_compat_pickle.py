"""The restricted unpickler admits the LeRobot protocol's objects and nothing that runs code."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")

from lerobot.async_inference.helpers import RemotePolicyConfig, TimedAction, TimedObservation  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402

from policylink.errors import ProtocolError  # noqa: E402
from policylink.server.safe_pickle import UnsafePickle, loads  # noqa: E402


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Exec:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('x')",))


def test_protocol_objects_round_trip():
    observation = TimedObservation(1.5, 7, {"joint.pos": 0.1, "front": np.zeros((4, 4, 3), np.uint8), "task": "t", "t": torch.ones(2)}, must_go=True)
    back = loads(pickle.dumps(observation))
    assert isinstance(back, TimedObservation) and back.timestep == 7 and back.must_go
    assert back.observation["front"].shape == (4, 4, 3) and torch.equal(back.observation["t"], torch.ones(2))
    actions = loads(pickle.dumps([TimedAction(0.0, 3, torch.arange(6.0))]))
    assert torch.equal(actions[0].action, torch.arange(6.0))
    config = loads(pickle.dumps(RemotePolicyConfig("act", "/ckpt", {"observation.state": PolicyFeature(FeatureType.STATE, (6,))}, 10)))
    assert config.lerobot_features["observation.state"].type is FeatureType.STATE


@pytest.mark.parametrize("exploit", [_System, _Exec])
def test_code_running_pickles_are_refused_before_they_run(exploit, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"observation": exploit(marker)})
    with pytest.raises(UnsafePickle, match="refusing to unpickle"):
        loads(payload)
    assert not marker.exists()
    pickle.loads(payload)  # the same bytes *do* run code with the plain unpickler: the test is not vacuous
    assert marker.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_exploit_hidden_in_a_torch_storage_is_refused(tmp_path, zipped):
    """Torch rebuilds storages with torch.load(weights_only=False); ours parses the legacy stream itself."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"x": _System(marker)}, buffer, _use_new_zipfile_serialization=zipped)

    class Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (buffer.getvalue(),))

    message = "zip archive" if zipped else "refusing to unpickle (posix|nt).system inside a torch storage"
    with pytest.raises(UnsafePickle, match=message):
        loads(pickle.dumps(Storage()))
    assert not marker.exists()


def test_garbage_is_a_clear_error():
    with pytest.raises(ProtocolError, match="malformed pickle"):
        loads(b"\x80\x04\x95 truncated")
