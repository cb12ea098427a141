"""SmolVLA, a flow-matching vision-language-action policy, served over real sockets.

Its backbone (a tiny SmolVLM config, tokenizer and processor) is built
offline, so LeRobot builds the whole policy without the Hugging Face hub.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lerobot")
pytest.importorskip("transformers", reason="SmolVLA needs the [vla] extra (transformers)")
pytestmark = pytest.mark.lerobot

import torch  # noqa: E402

from lerobot_checkpoints import run_in_process, smolvla_dir  # noqa: E402,F401
from policylink import PolicyClient  # noqa: E402
from policylink.backends.lerobot import load_from_request, load_policy  # noqa: E402
from policylink.server.background import BackgroundServer  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def smolvla_server(smolvla_dir: Path) -> Iterator[BackgroundServer]:
    server = BackgroundServer(load_policy(smolvla_dir, device="cpu"), host="127.0.0.1").start()
    yield server
    server.stop()


def observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation.state": rng.normal(size=6).astype(np.float32), "observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}


def seeded_infer(client: PolicyClient, obs: dict) -> np.ndarray:
    """Flow matching starts from noise: seed torch's global generator, which the server thread draws from."""
    torch.manual_seed(0)
    return np.asarray(client.infer(obs))


def test_smolvla_serves_a_chunk_with_its_metadata(smolvla_server):
    with PolicyClient(smolvla_server.url) as client:
        meta = client.metadata
        assert (meta.policy_type, meta.horizon, meta.action_dim, meta.camera_names) == ("smolvla", 8, 6, ("front",))
        frame = np.zeros((480, 640, 3), np.uint8)  # a camera frame, resized by the server
        chunk = client.infer({"observation/state": np.zeros(6, np.float32), "observation/image": frame, "prompt": "pick the red cube"})
    assert chunk.shape == (8, 6) and np.isfinite(chunk).all()


def test_smolvla_matches_lerobot_in_process_and_reads_the_prompt(smolvla_server, smolvla_dir):
    obs = observation(1)
    with PolicyClient(smolvla_server.url) as client:
        red = seeded_infer(client, {**obs, "task": "pick the red cube"})
        red_again = seeded_infer(client, {**obs, "task": "pick the red cube"})
        blue = seeded_infer(client, {**obs, "task": "stack the blue cubes"})
    np.testing.assert_allclose(red, red_again, atol=1e-5)
    assert not np.allclose(red, blue, atol=1e-4), "the prompt must reach the model through the tokenizer"
    image = torch.from_numpy(obs["observation.images.front"]).permute(2, 0, 1).float() / 255.0
    batch = {"observation.state": torch.from_numpy(obs["observation.state"]), "observation.images.front": image, "task": "pick the red cube"}
    expected = run_in_process(smolvla_dir, batch, seed=0)
    np.testing.assert_allclose(red, expected, rtol=1e-4, atol=1e-4)


def test_configure_task_is_smolvlas_prompt(serve, smolvla_dir):
    server = serve(Engine(None, loader=load_from_request))
    obs = observation(2)
    with PolicyClient(server.url) as explicit, PolicyClient(server.url) as configured:
        explicit.configure(str(smolvla_dir), device="cpu")
        configured.configure(str(smolvla_dir), device="cpu", task="lift the green cube")
        by_observation = seeded_infer(explicit, {**obs, "task": "lift the green cube"})
        by_configure = seeded_infer(configured, obs)
    np.testing.assert_allclose(by_configure, by_observation, atol=1e-5)
    assert server.engine.models.loads == 1
