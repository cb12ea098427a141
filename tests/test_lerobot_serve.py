"""Real LeRobot checkpoints (ACT, Diffusion) served over real sockets."""

from __future__ import annotations

import io
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lerobot")
pytestmark = pytest.mark.lerobot

import torch  # noqa: E402

from conftest import POLICYLINK, free_port  # noqa: E402
from lerobot_checkpoints import act_dir, act_two_cams_dir, diffusion_dir, run_in_process  # noqa: E402,F401
from policylink import PolicyClient  # noqa: E402
from policylink.backends.lerobot import load_policy  # noqa: E402
from policylink.errors import ServerError  # noqa: E402
from policylink.server.background import BackgroundServer  # noqa: E402



def served(directory: Path, **options) -> Iterator[BackgroundServer]:
    server = BackgroundServer(load_policy(directory, device="cpu", **options), host="127.0.0.1").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def act_server(act_dir: Path) -> Iterator[BackgroundServer]:
    yield from served(act_dir)


@pytest.fixture(scope="module")
def two_cams_server(act_two_cams_dir: Path) -> Iterator[BackgroundServer]:
    yield from served(act_two_cams_dir, rename_map="top=front,hand=wrist")


@pytest.fixture(scope="module")
def diffusion_server(diffusion_dir: Path) -> Iterator[BackgroundServer]:
    yield from served(diffusion_dir)


def act_obs(seed: int = 0, size: tuple[int, int] = (48, 64)) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation.state": rng.normal(size=6).astype(np.float32),
        "observation.images.front": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
    }


def two_cam_obs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = rng.normal(size=6).astype(np.float32)
    front = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return state, front, wrist


# -- metadata, shape, determinism, normalisation ----------------------------


def test_metadata_announces_the_checkpoints_real_features(act_server, act_dir):
    with PolicyClient(act_server.url) as client:
        meta = client.metadata
    assert meta.policy_type == "act"
    assert meta.model_id == str(act_dir)
    assert (meta.horizon, meta.action_dim, meta.n_action_steps) == (16, 6, 16)
    assert meta.camera_names == ("front",)
    assert meta.input_features["observation.state"].shape == (6,)
    # Images are announced the way a client sends them: HxWx3 uint8 at the policy's size.
    assert meta.input_features["observation.images.front"].shape == (48, 64, 3)
    assert meta.input_features["observation.images.front"].dtype == "uint8"
    assert "cpu" in meta.description


def test_act_chunk_shape_and_determinism(act_server):
    with PolicyClient(act_server.url) as client:
        first = client.infer(act_obs(1))
        second = client.infer(act_obs(1))
        other = client.infer(act_obs(2))
    assert first.shape == (16, 6) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other), "a different observation must give a different chunk"
    assert first.server_timing["infer_ms"] > 0


def test_served_act_matches_lerobot_in_process_with_normalisation(act_server, act_dir):
    obs = act_obs(3)
    with PolicyClient(act_server.url) as client:
        served_chunk = np.asarray(client.infer(obs))
    image = torch.from_numpy(obs["observation.images.front"]).permute(2, 0, 1).float() / 255.0
    batch = {"observation.state": torch.from_numpy(obs["observation.state"]), "observation.images.front": image, "task": ""}
    expected = run_in_process(act_dir, batch)
    np.testing.assert_allclose(served_chunk, expected, rtol=1e-4, atol=1e-4)
    # The saved statistics matter: without them the same model gives very different actions.
    policy = load_policy(act_dir, device="cpu")
    with torch.no_grad():
        raw = policy.model.predict_action_chunk({k: v[None] for k, v in batch.items() if k != "task"})[0].numpy()
    assert np.abs(raw - served_chunk).mean() > 1.0


def test_images_are_resized_to_the_policy_input(act_server):
    state = np.zeros(6, np.float32)
    small = np.full((48, 64, 3), 90, np.uint8)
    camera = np.full((480, 640, 3), 90, np.uint8)  # a constant frame resizes exactly
    with PolicyClient(act_server.url) as client:
        a = client.infer({"observation.state": state, "observation.images.front": small})
        b = client.infer({"observation.state": state, "observation.images.front": camera})
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_diffusion_chunk_and_per_client_history(diffusion_server):
    server = diffusion_server
    rng = np.random.default_rng(0)
    obs_a = {"observation.state": np.full(6, 0.5, np.float32), "observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    obs_b = {"observation.state": np.full(6, -0.5, np.float32), "observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    with PolicyClient(server.url) as a, PolicyClient(server.url) as b:
        assert a.metadata.policy_type == "diffusion"
        assert a.metadata.horizon == 8  # Diffusion returns its n_action_steps
        chunk = a.infer(obs_a)
        b.infer(obs_b)
        a.infer(obs_a)
        assert chunk.shape == (8, 6) and np.isfinite(chunk).all()
        sessions = {s.client_id: s for s in server.engine.sessions.values()}
        histories = [s.policy._state["queues"]["observation.state"] for s in sessions.values()]
    # Each client's observation history holds only its own (normalised) states.
    means = sorted(float(torch.stack(list(h)).mean()) for h in histories)
    assert len(histories) == 2 and all(len(h) == 2 for h in histories)
    assert means[0] < means[1]
    for history in histories:
        values = torch.stack(list(history))
        assert torch.allclose(values, values[0].expand_as(values))


def test_reset_clears_the_clients_history(diffusion_server):
    obs = {"observation.state": np.zeros(6, np.float32), "observation.images.front": np.zeros((32, 32, 3), np.uint8)}
    with PolicyClient(diffusion_server.url) as client:
        client.infer(obs)
        session = next(iter(diffusion_server.engine.sessions.values()))
        assert "queues" in session.policy._state
        client.reset()
        assert "queues" not in session.policy._state
        assert client.infer(obs).shape == (8, 6)


# -- observation conventions -------------------------------------------------


def test_every_convention_gives_the_same_chunk(two_cams_server):
    state, front, wrist = two_cam_obs(4)
    layouts = {
        "lerobot": {"observation.state": state, "observation.images.front": front, "observation.images.wrist": wrist, "task": "pick"},
        "openpi": {"observation/state": state, "observation/image": front, "observation/wrist_image": wrist, "prompt": "pick"},
        "nested": {"images": {"front": front, "wrist": wrist}, "states": {"arm": state}},
        "chw_float": {"observation.state": state, "observation.images.front": front.transpose(2, 0, 1) / np.float32(255),
                      "observation.images.wrist": wrist.transpose(2, 0, 1).astype(np.float32) / 255},
        "renamed": {"images": {"top": front, "hand": wrist}, "states": {"arm": state}},
        "batched": {"observation.state": state[None], "observation.images.front": front[None], "observation.images.wrist": wrist[None]},
    }
    with PolicyClient(two_cams_server.url) as client:
        chunks = {name: np.asarray(client.infer(obs)) for name, obs in layouts.items()}
    reference = chunks.pop("lerobot")
    assert reference.shape == (16, 6)
    for name, chunk in chunks.items():
        np.testing.assert_allclose(chunk, reference, atol=1e-5, err_msg=name)


def test_jpeg_images_are_decoded(act_server):
    from PIL import Image

    frame = np.full((48, 64, 3), 120, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
    state = np.zeros(6, np.float32)
    with PolicyClient(act_server.url) as client:
        raw = client.infer({"observation.state": state, "observation.images.front": frame})
        jpeg = client.infer({"observation.state": state, "observation.images.front": buffer.getvalue()})
    np.testing.assert_allclose(jpeg, raw, atol=0.05)


# -- errors: named, sent to that client, server keeps serving ----------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.update({"observation.state": np.zeros(12, np.float32)}), "state has 12 values, the policy expects 6"),
        (lambda o: o.update({"observation.state": np.array([0, 1, np.nan, 0, 0, 0], np.float32)}), "NaN in observation.state"),
        (lambda o: o.pop("observation.images.wrist"), r"camera 'wrist' missing; policy needs \['front', 'wrist'\]"),
        (lambda o: o.pop("observation.state"), "observation.state missing"),
        (lambda o: o.update({"observation.images.front": np.zeros((32, 32), np.uint8)}), r"camera 'front' image has shape \(32, 32\)"),
        (lambda o: o.update({"observation.state": "high"}), "observation.state must be numbers"),
        (lambda o: o.update({"task": 3}), "'task' must be a string"),
    ],
    ids=["state-size", "nan", "missing-camera", "missing-state", "image-shape", "state-type", "task-type"],
)
def test_bad_observation_gets_a_clear_error_and_the_connection_lives(two_cams_server, change, message):
    state, front, wrist = two_cam_obs(5)
    good = {"observation.state": state, "observation.images.front": front, "observation.images.wrist": wrist}
    bad = dict(good)
    change(bad)
    with PolicyClient(two_cams_server.url) as client, PolicyClient(two_cams_server.url) as bystander:
        with pytest.raises(ServerError, match=message):
            client.infer(bad)
        assert client.infer(good).shape == (16, 6)
        assert bystander.infer(good).shape == (16, 6)


# -- other clients -------------------------------------------------------------


def test_openpi_client_drives_a_served_act(act_server):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    client = WebsocketClientPolicy(host="127.0.0.1", port=act_server.port)
    assert client.get_server_metadata()["policy_type"] == "act"
    obs = act_obs(6, size=(480, 640))
    reply = client.infer({"observation/state": obs["observation.state"], "observation/image": obs["observation.images.front"], "prompt": "pick"})
    assert reply["actions"].shape == (16, 6)
    assert np.isfinite(reply["actions"]).all()


def test_cli_serve_policy_path_then_infer_and_inspect(act_dir, diffusion_dir):
    port = free_port()
    server = subprocess.Popen(
        [*POLICYLINK, "serve", "--policy.path", str(act_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"ws://127.0.0.1:{port}"
        out = subprocess.run([*POLICYLINK, "infer", "--server", url, "--repeat", "2", "--connect-timeout", "120"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert "(act), action_dim=6, horizon=16" in out.stdout
        assert out.stdout.count("chunk (16, 6)") == 2
        # The same server loads another checkpoint for a client that asks for it.
        out = subprocess.run([*POLICYLINK, "infer", "--server", url, "--policy.path", str(diffusion_dir)],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert "chunk (8, 6)" in out.stdout
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=30)
    log = server.stdout.read()
    assert code == 0, log
    assert f"serving policy {act_dir}" in log
    assert "on cpu (float32)" in log
    assert "server stopped" in log

    summary = subprocess.run([*POLICYLINK, "inspect", str(diffusion_dir), "--json"], capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    data = json.loads(summary.stdout)
    assert data["type"] == "diffusion" and data["chunk_length"] == 8 and data["cameras"] == ["front"]
    assert set(data["client_must_send"]) == {"observation.state", "observation.images.front"}
    text = subprocess.run([*POLICYLINK, "inspect", str(act_dir)], capture_output=True, text=True, timeout=120)
    assert "type:       act" in text.stdout and "observation.images.front" in text.stdout
    missing = subprocess.run([*POLICYLINK, "inspect", str(act_dir / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


# -- batching across clients -----------------------------------------------------


def test_batched_forward_pass_equals_one_by_one(act_dir):
    policy = load_policy(act_dir, device="cpu")
    observations = [act_obs(10), {"images": {"front": act_obs(11)["observation.images.front"]}, "states": {"arm": act_obs(11)["observation.state"]}}, act_obs(12, size=(480, 640))]
    sessions = [policy.session() for _ in observations]
    assert policy.batch_key(observations[0]) == policy.batch_key(observations[2]) is not None
    batched = policy.infer_batch(sessions, observations)
    for session, obs, reply in zip(sessions, observations, batched):
        np.testing.assert_allclose(reply["actions"], session.infer(obs)["actions"], atol=1e-4)


def test_concurrent_clients_each_get_their_own_chunk(act_server):
    import threading

    observations = [act_obs(20 + i) for i in range(4)]
    with PolicyClient(act_server.url) as reference:
        expected = [np.asarray(reference.infer(obs)) for obs in observations]
    results: dict[int, np.ndarray] = {}

    def drive(index: int) -> None:
        with PolicyClient(act_server.url) as client:
            for _ in range(3):
                results[index] = np.asarray(client.infer(observations[index]))

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(observations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [0, 1, 2, 3]
    for index, chunk in results.items():
        np.testing.assert_allclose(chunk, expected[index], atol=1e-4)


def test_gpu_ms_only_where_the_device_is_timed(act_server, act_dir):
    """``gpu_ms`` comes from CUDA events: absent on a CPU server; on CUDA within the request's ``infer_ms``."""
    with PolicyClient(act_server.url) as client:
        assert "gpu_ms" not in client.infer(act_obs()).server_timing
    if not torch.cuda.is_available():
        return  # no accelerator on this machine: the CUDA half runs where there is one
    server = BackgroundServer(load_policy(act_dir, device="cuda"), host="127.0.0.1").start()
    try:
        with PolicyClient(server.url) as client:
            timing = client.infer(act_obs()).server_timing
    finally:
        server.stop()
    assert 0 < timing["gpu_ms"] <= timing["infer_ms"]
