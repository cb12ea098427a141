"""Observation mapping rules (numpy only: runs without torch or lerobot)."""

from __future__ import annotations

import numpy as np
import pytest

from policylink.backends.obsmap import ObservationSpec, map_observation, parse_rename_map
from policylink.errors import RequestError

SPEC = ObservationSpec.from_feature_keys(
    {"observation.state": (6,), "observation.images.front": (3, 24, 32), "observation.images.wrist": (3, 24, 32)}
)
STATE = np.arange(6, dtype=np.float32)
FRONT = np.full((480, 640, 3), 1, np.uint8)
WRIST = np.full((480, 640, 3), 2, np.uint8)


def cameras(mapped) -> dict[str, int]:
    """Which frame landed on which policy camera (frames are constant 1 or 2)."""
    return {key: int(np.asarray(image).flat[0]) for key, image in mapped.images.items()}


def test_spec_from_lerobot_features():
    assert SPEC.state_dim == 6 and SPEC.env_state_dim is None
    assert dict(SPEC.cameras) == {"front": "observation.images.front", "wrist": "observation.images.wrist"}
    single = ObservationSpec.from_feature_keys({"observation.image": (3, 96, 96), "observation.environment_state": (4,)})
    assert dict(single.cameras) == {"image": "observation.image"} and single.state_dim is None and single.env_state_dim == 4


def test_openpi_aliases_pick_first_camera_and_wrist():
    mapped = map_observation({"observation/state": STATE, "observation/wrist_image": WRIST, "observation/image": FRONT, "prompt": "pick"}, SPEC)
    assert cameras(mapped) == {"observation.images.front": 1, "observation.images.wrist": 2}
    assert mapped.task == "pick"
    np.testing.assert_array_equal(mapped.state, STATE)


def test_task_wins_over_prompt_and_default_applies_only_when_absent():
    assert map_observation({"prompt": "a", "task": "b", "images": {"front": FRONT, "wrist": WRIST}, "state": STATE}, SPEC).task == "b"
    assert map_observation({"images": {"front": FRONT, "wrist": WRIST}, "state": STATE}, SPEC, default_task="d").task == "d"


def test_rename_map_and_its_parser():
    spec = ObservationSpec.from_feature_keys({"observation.images.front": (3, 8, 8), "observation.images.wrist": (3, 8, 8)}, parse_rename_map("top=front, hand=wrist"))
    mapped = map_observation({"images": {"top": FRONT, "hand": WRIST}}, spec)
    assert cameras(mapped) == {"observation.images.front": 1, "observation.images.wrist": 2}
    assert parse_rename_map({"a": "b"}) == {"a": "b"} and parse_rename_map(None) == {}
    with pytest.raises(ValueError, match="bad rename 'top'"):
        parse_rename_map("top")


def test_image_layouts_are_normalised():
    chw_uint8 = np.zeros((3, 24, 32), np.uint8)
    hwc_float = np.zeros((24, 32, 3), np.float64)
    mapped = map_observation({"state": STATE, "images": {"front": chw_uint8, "wrist": hwc_float}}, SPEC)
    assert mapped.images["observation.images.front"].shape == (24, 32, 3)  # uint8 becomes HxWx3
    assert mapped.images["observation.images.wrist"].shape == (3, 24, 32)  # float becomes 3xHxW float32
    assert mapped.images["observation.images.wrist"].dtype == np.float32


@pytest.mark.parametrize(
    ("obs", "message"),
    [
        ({"states": {"left_arm": STATE, "right_arm": STATE}}, "state has 12 values, the policy expects 6"),
        ({"state": np.array([0, 0, 0, 0, 0, np.inf], np.float32)}, "infinite value in observation.state"),
        ({"state": np.zeros((2, 3), np.float32)}, r"observation.state must be a vector, got shape \(2, 3\)"),
        ({"states": [1, 2]}, "'states' must map part names"),
        ({"state": STATE, "images": [FRONT]}, "'images' must map camera names"),
        ({"state": STATE, "images": {"front": FRONT}}, r"camera 'wrist' missing; policy needs \['front', 'wrist'\] \(got \['front'\]"),
        ({"state": STATE, "images": {"front": FRONT, "wrist": np.zeros((8, 8, 3), np.int32)}}, "camera 'wrist' image has dtype int32"),
        ({"state": STATE, "images": {"front": FRONT, "wrist": np.full((3, 8, 8), np.nan, np.float32)}}, "NaN or infinite value in camera 'wrist'"),
        ({"state": STATE, "images": {"front": FRONT, "wrist": b"not a jpeg"}}, "camera 'wrist' image could not be decoded"),
    ],
)
def test_mismatches_are_named(obs, message):
    with pytest.raises(RequestError, match=message):
        map_observation(obs, SPEC)


def test_unrelated_keys_are_ignored():
    mapped = map_observation({"state": STATE, "images": {"front": FRONT, "wrist": WRIST, "extra": FRONT}, "step": 3, "timestamp": 1.5}, SPEC)
    assert set(mapped.images) == {"observation.images.front", "observation.images.wrist"}
