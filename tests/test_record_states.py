"""One order for bimanual states everywhere: left before right.

The recorder and the monitor read states with ``media.state_vector``; the
server joins them for the policy in ``backends.obsmap``. Both must give the
same vector, whatever order the client's ``states`` map has.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from policylink.backends.obsmap import ObservationSpec, map_observation
from policylink.media import state_part_order, state_vector
from policylink.record import SessionRecorder
from policylink.runtime.events import StepEvent

LEFT = np.arange(6, dtype=np.float32)
RIGHT = 10 + np.arange(6, dtype=np.float32)
TORSO = np.array([-1.0, -2.0], np.float32)


@pytest.mark.parametrize(
    "states",
    [
        {"left_arm": LEFT, "right_arm": RIGHT},
        {"right_arm": RIGHT, "left_arm": LEFT},  # the client's map in the other order
    ],
)
def test_bimanual_state_is_left_then_right_in_media_and_obsmap(states: dict[str, np.ndarray]) -> None:
    expected = np.concatenate([LEFT, RIGHT])
    np.testing.assert_array_equal(state_vector({"states": states}), expected)
    mapped = map_observation({"states": states}, ObservationSpec(state_dim=12))
    np.testing.assert_array_equal(mapped.state, expected)


def test_other_parts_sit_between_left_and_right() -> None:
    states = {"right_arm": RIGHT, "torso": TORSO, "left_arm": LEFT}
    assert state_part_order(states) == ["left_arm", "torso", "right_arm"]
    assert state_part_order(["Right", "LEFT_gripper", "head", "neck"]) == ["LEFT_gripper", "head", "neck", "Right"]
    expected = np.concatenate([LEFT, TORSO, RIGHT])
    np.testing.assert_array_equal(state_vector({"states": states}), expected)
    np.testing.assert_array_equal(map_observation({"states": states}, ObservationSpec(state_dim=14)).state, expected)
    # One arm: the vector itself.
    np.testing.assert_array_equal(state_vector({"states": {"arm": LEFT}}), LEFT)


def test_recorder_writes_the_bimanual_state_left_then_right(tmp_path: Path) -> None:
    recorder = SessionRecorder(tmp_path, images=False, name="bimanual")
    observation = {"states": {"right_arm": RIGHT, "left_arm": LEFT}}
    recorder.on_step(StepEvent(0, 0, time.time(), observation, np.zeros(12, np.float32), 1, True))
    recorder.close()
    (line,) = [json.loads(text) for text in (tmp_path / "bimanual" / "inference_log.jsonl").read_text().splitlines()]
    assert line["state"] == np.concatenate([LEFT, RIGHT]).tolist()
    assert line["state"] == map_observation(observation, ObservationSpec(state_dim=12)).state.tolist()
