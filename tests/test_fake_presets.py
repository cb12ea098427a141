"""The fake environment's grasp-cube task presets and its openpi observation keys.

The presets are the seeds' tasks (lift and stack: one arm, 6-d; sort: two
arms, 12-d), each with cameras front, left_wrist, right_wrist at 480x640 and
a default instruction. ``keys="openpi"`` renames the observation's keys to
openpi's and changes nothing else.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import POLICYLINK
from policylink.backends.obsmap import ObservationSpec, map_observation
from policylink.cli import build_parser, main
from policylink.cli.run import make_env
from policylink.envs.fake import PRESETS, FakeEnv
from policylink.media import decode_jpeg, jpeg_available

CAMERAS = ("front", "left_wrist", "right_wrist")
EXPECTED = {"lift": (6, "lift the cube"), "sort": (12, "sort the cubes"), "stack": (6, "stack the cubes")}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_each_preset_has_its_state_size_cameras_and_instruction(preset):
    dim, instruction = EXPECTED[preset]
    env = FakeEnv(preset=preset)
    obs = env.reset(seed=1)
    assert env.action_dim == dim and env.camera_names == CAMERAS and env.image_size == (480, 640)
    assert obs["observation.state"].shape == (dim,) and obs["observation.state"].dtype == np.float32
    assert set(obs) == {"observation.state", "task", *(f"observation.images.{camera}" for camera in CAMERAS)}
    for camera in CAMERAS:
        frame = obs[f"observation.images.{camera}"]
        assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    assert obs["task"] == instruction
    assert env.step(np.zeros(dim, np.float32)).observation["task"] == instruction
    # The published table says the same.
    assert (PRESETS[preset].dim, PRESETS[preset].cameras, PRESETS[preset].image_size, PRESETS[preset].instruction) == (
        dim, CAMERAS, (480, 640), instruction,
    )


def test_a_preset_may_be_refined_but_not_contradicted():
    env = FakeEnv("bimanual", preset="sort", cameras=["front"], image_size=(24, 32), task="put the red cube left")
    obs = env.reset()
    assert (env.action_dim, env.camera_names, env.image_size) == (12, ("front",), (24, 32))
    assert obs["observation.images.front"].shape == (24, 32, 3) and obs["task"] == "put the red cube left"
    with pytest.raises(ValueError, match=r"preset 'sort' is a bimanual \(12-d\) task, but layout 'single'.*--env.task sort contradicts --env.layout single"):
        FakeEnv("single", preset="sort")
    with pytest.raises(ValueError, match=r"preset 'lift' has the cameras .*not \['top'\]"):
        FakeEnv(preset="lift", cameras=["front", "top"])
    with pytest.raises(ValueError, match=r"unknown fake task preset 'pick'; choose one of \['lift', 'sort', 'stack'\]"):
        FakeEnv(preset="pick")
    assert "task" not in FakeEnv(image_size=(8, 8)).reset()  # no preset, no instruction: as before


def test_openpi_keys_rename_the_observation_and_nothing_else():
    lerobot = FakeEnv(preset="sort", image_size=(24, 32))
    openpi = FakeEnv(preset="sort", image_size=(24, 32), keys="openpi")
    before, obs = lerobot.reset(seed=5), openpi.reset(seed=5)
    assert set(obs) == {"observation/state", "observation/image", "observation/left_wrist_image", "observation/right_wrist_image", "prompt"}
    assert obs["observation/state"].shape == (12,) and obs["observation/state"].dtype == np.float32
    for key in ("observation/image", "observation/left_wrist_image", "observation/right_wrist_image"):
        assert obs[key].shape == (24, 32, 3) and obs[key].dtype == np.uint8
    assert obs["prompt"] == "sort the cubes"
    # Same values under the other names, same state and stepping.
    np.testing.assert_array_equal(obs["observation/state"], before["observation.state"])
    for camera, key in openpi.image_keys.items():
        np.testing.assert_array_equal(obs[key], before[f"observation.images.{camera}"])
    action = np.full(12, 0.3, np.float32)
    after, after_lerobot = openpi.step(action), lerobot.step(action)
    np.testing.assert_array_equal(openpi.state(), lerobot.state())
    np.testing.assert_array_equal(after.observation["observation/state"], after_lerobot.observation["observation.state"])
    assert after.truncated == after_lerobot.truncated


def test_openpi_keys_of_two_cameras_are_libero_s_and_map_back_on_a_policylink_server():
    libero = FakeEnv(cameras=["agentview", "wrist"], image_size=(24, 32), task="pick up the bowl", keys="openpi").reset()
    assert set(libero) == {"observation/state", "observation/image", "observation/wrist_image", "prompt"}
    assert set(FakeEnv(cameras=[], keys="openpi").reset()) == {"observation/state"}
    # The server's observation mapping reads every openpi key back as the camera it came from.
    env = FakeEnv(preset="lift", image_size=(24, 32), keys="openpi")
    obs = env.reset()
    spec = ObservationSpec.from_feature_keys({"observation.state": (6,), **{f"observation.images.{c}": (24, 32, 3) for c in CAMERAS}})
    mapped = map_observation(obs, spec)
    np.testing.assert_array_equal(mapped.state, obs["observation/state"])
    for camera, key in env.image_keys.items():
        np.testing.assert_array_equal(mapped.images[f"observation.images.{camera}"], obs[key])
    assert mapped.task == "lift the cube"


def test_cli_flags_build_the_preset_and_refuse_a_contradiction(capsys):
    def env_of(*flags: str) -> FakeEnv:
        return make_env(build_parser().parse_args(["run", *flags]))

    env = env_of("--env.task", "sort", "--env.layout", "bimanual", "--env.cameras", "front,right_wrist", "--env.image_size", "24x32", "--env.keys", "openpi")
    assert (env.preset, env.action_dim, env.camera_names, env.image_size, env.keys) == ("sort", 12, ("front", "right_wrist"), (24, 32), "openpi")
    assert env_of("--env.task", "stack", "--task", "stack red on blue").task == "stack red on blue"
    assert (env_of().layout, env_of().image_size, env_of().keys) == ("single", (480, 640), "lerobot")  # defaults unchanged
    # Refused before any server starts, naming both flags.
    assert main(["run", "--policy.type", "replay", "--env.task", "sort", "--env.layout", "single"]) == 1
    err = capsys.readouterr().err
    assert "--env.task sort contradicts --env.layout single" in err and "choose a task whose layout is single: lift, stack" in err
    assert main(["run", "--policy.type", "replay", "--env.task", "lift", "--env.cameras", "top"]) == 1
    assert "--env.cameras can only choose among --env.task lift's cameras" in capsys.readouterr().err


def run_policylink(*flags: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*POLICYLINK, "run", "--policy.type", "replay", "--sim-latency-steps", "1", "--fps", "60", *flags],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def only_session(directory: Path) -> Path:
    sessions = [path for path in directory.iterdir() if path.is_dir()]
    assert len(sessions) == 1, sessions
    return sessions[0]


@pytest.mark.skipif(not jpeg_available(), reason="recording camera frames needs a JPEG coder")
def test_run_sort_preset_sends_the_policy_two_arms_and_three_cameras(tmp_path):
    out = run_policylink("--env.task", "sort", "--env.image_size", "24x32", "--env.episode_steps", "12", "--record", str(tmp_path))
    assert "on FakeEnv(preset='sort', layout='bimanual', cameras=['front', 'left_wrist', 'right_wrist'], image_size=(24, 32))" in out.stdout
    session = only_session(tmp_path)
    # The local policy was built from the environment's shapes, and was asked 12-d, three-camera observations.
    policy = json.loads((session / "metadata.json").read_text())["policy"]
    assert policy["action_dim"] == 12 and policy["camera_names"] == list(CAMERAS)
    assert policy["input_features"] == {
        "observation.state": {"shape": [12], "dtype": "float32"},
        **{f"observation.images.{camera}": {"shape": [24, 32, 3], "dtype": "uint8"} for camera in CAMERAS},
    }
    lines = [json.loads(line) for line in (session / "inference_log.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    assert all(len(line["state"]) == 12 and len(line["action"]) == 12 and line["task"] == "sort the cubes" for line in lines)
    assert sorted(lines[0]["images"]) == sorted(CAMERAS)
    for camera, relative in lines[0]["images"].items():
        assert decode_jpeg((session / relative).read_bytes()).shape == (24, 32, 3), camera
    chunks = [json.loads(line) for line in (session / "chunks.jsonl").read_text().splitlines()]
    assert chunks and all(chunk["accepted"] and np.shape(chunk["actions"])[1:] == (12,) for chunk in chunks)


def test_run_with_openpi_keys_sends_observation_state_and_prompt(tmp_path):
    # No cameras: the local server's camera sizing still reads LeRobot image keys.
    run_policylink("--env.task", "lift", "--env.cameras", "", "--env.keys", "openpi", "--env.episode_steps", "8", "--record", str(tmp_path))
    lines = [json.loads(line) for line in (only_session(tmp_path) / "inference_log.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(len(line["state"]) == 6 and line["task"] == "lift the cube" for line in lines)
