"""The grasp-cube shapes from the seeds, served by real ACT checkpoints.

lift and stack: one arm, 6-d state and action; sort: two arms, 12-d. A front
camera plus optional wrist cameras, sent by the client at 480x640 as cameras
deliver them and resized by the server to the policy's input size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("lerobot")
pytestmark = pytest.mark.lerobot

from lerobot_checkpoints import build  # noqa: E402
from policylink import PolicyClient  # noqa: E402
from policylink.backends.lerobot import load_policy  # noqa: E402
from policylink.errors import ServerError  # noqa: E402
from policylink.server.background import BackgroundServer  # noqa: E402

CAMERA = (480, 640)
POLICY_IMAGE = (24, 32)  # same 3:4 aspect as the cameras, small to keep the tests fast

TASKS = {
    "lift": {"dim": 6, "cameras": ["front"]},
    "stack": {"dim": 6, "cameras": ["front", "wrist"]},
    "sort": {"dim": 12, "cameras": ["front", "left_wrist", "right_wrist"]},
}


@pytest.fixture(scope="module", params=sorted(TASKS))
def task_server(request, tmp_path_factory) -> Iterator[tuple[str, BackgroundServer]]:
    name = request.param
    spec = TASKS[name]
    directory = build(tmp_path_factory, f"graspcube_{name}", state_dim=spec["dim"], action_dim=spec["dim"],
                      cameras={camera: POLICY_IMAGE for camera in spec["cameras"]})
    server = BackgroundServer(load_policy(directory, device="cpu"), host="127.0.0.1").start()
    yield name, server
    server.stop()


def frames(cameras: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {camera: rng.integers(0, 256, (*CAMERA, 3), dtype=np.uint8) for camera in cameras}


def test_grasp_cube_chunk_shape(task_server):
    name, server = task_server
    dim, cameras = TASKS[name]["dim"], TASKS[name]["cameras"]
    rng = np.random.default_rng(1)
    if name == "sort":
        states = {"left_arm": rng.normal(size=6).astype(np.float32), "right_arm": rng.normal(size=6).astype(np.float32)}
    else:
        states = {"arm": rng.normal(size=6).astype(np.float32)}
    with PolicyClient(server.url) as client:
        meta = client.metadata
        assert (meta.action_dim, meta.horizon) == (dim, 16)
        assert list(meta.camera_names) == cameras
        chunk = client.infer({"images": frames(cameras), "states": states, "task": f"{name} the cube"})
    assert chunk.shape == (16, dim) and chunk.dtype == np.float32
    assert np.isfinite(chunk).all()


@pytest.fixture(scope="module")
def sort_server(tmp_path_factory) -> Iterator[BackgroundServer]:
    directory = build(tmp_path_factory, "graspcube_sort", state_dim=12, action_dim=12,
                      cameras={camera: POLICY_IMAGE for camera in TASKS["sort"]["cameras"]})
    server = BackgroundServer(load_policy(directory, device="cpu"), host="127.0.0.1").start()
    yield server
    server.stop()


def test_sort_bimanual_layouts_agree_and_wrong_size_is_named(sort_server):
    left, right = np.linspace(-1, 0, 6, dtype=np.float32), np.linspace(0, 1, 6, dtype=np.float32)
    images = frames(TASKS["sort"]["cameras"], seed=3)
    with PolicyClient(sort_server.url) as client:
        flat = client.infer({"observation.state": np.concatenate([left, right]), **{f"observation.images.{k}": v for k, v in images.items()}})
        # Right sent first: the server still puts the left arm first.
        nested = client.infer({"images": images, "states": {"right_arm": right, "left_arm": left}})
        with pytest.raises(ServerError, match="state has 6 values, the policy expects 12"):
            client.infer({"images": images, "states": {"arm": left}})
        with pytest.raises(ServerError, match=r"camera 'right_wrist' missing; policy needs \['front', 'left_wrist', 'right_wrist'\]"):
            client.infer({"images": {k: v for k, v in images.items() if k != "right_wrist"}, "states": {"left_arm": left, "right_arm": right}})
    np.testing.assert_allclose(nested, flat, atol=1e-5)
