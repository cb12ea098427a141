"""pi0 and pi0.5, Physical Intelligence's flow-matching VLAs in LeRobot, served over real sockets.

The checkpoints are saved with LeRobot's own code, random weights, at the
smallest size LeRobot's pi0 / pi0.5 run (gemma_2b + gemma_300m: 3.5 B
parameters, 14 GB of float32 weights), with a PaliGemma-style tokenizer
built offline. The model tests need LeRobot's patched transformers and about
34 GiB of memory and skip without them (the reason is in the skip message:
:func:`lerobot_checkpoints.pi_unavailable`); the pre-processor test runs
everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("lerobot")
pytest.importorskip("transformers", reason="pi0 / pi0.5 need the [vla] extra (transformers)")
pytestmark = pytest.mark.lerobot

import torch  # noqa: E402
from lerobot.policies.factory import make_pre_post_processors  # noqa: E402
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS  # noqa: E402

from lerobot_checkpoints import (  # noqa: E402,F401
    build_paligemma_tokenizer, pi05_dir, pi0_dir, pi_config, pi_stats, release_memory, run_in_process, save_processors,
)
from policylink import PolicyClient  # noqa: E402
from policylink.backends.lerobot import load_from_request  # noqa: E402
from policylink.rtc import RTC_KEY, SEED_KEY  # noqa: E402
from policylink.server.background import BackgroundServer  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402

KINDS = ("pi0", "pi05")
#: A model test's first item builds a 14 GB checkpoint, runs LeRobot on it, and loads it in the server.
SLOW = pytest.mark.timeout(900)
TASK = "pick the red cube"
#: The stand-in tokenizer's ids (PaliGemma's): <pad>, <bos>, <unk>.
PAD, BOS, UNK = 0, 2, 3


def observation(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"observation.state": rng.normal(size=6).astype(np.float32), "observation.images.front": rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)}


def lerobot_batch(obs: dict[str, Any], task: str) -> dict[str, Any]:
    """The observation as LeRobot's own code takes it: tensors, the image float 3xHxW in [0, 1]."""
    image = torch.from_numpy(obs["observation.images.front"]).permute(2, 0, 1).float() / 255.0
    return {"observation.state": torch.from_numpy(obs["observation.state"]), "observation.images.front": image, "task": task}


def gap(chunk: np.ndarray, prefix: np.ndarray, steps: int) -> float:
    return float(np.abs(chunk[:steps] - prefix[:steps]).mean())


# -- the pre-processor: LeRobot's pipeline with the offline tokenizer (no model, runs everywhere) ---------


@pytest.mark.parametrize("kind", KINDS)
def test_pre_processor_tokenizes_the_prompt_offline(kind, tmp_path):
    config = pi_config(kind)
    tokenizer = build_paligemma_tokenizer(tmp_path / "tokenizer")
    directory = save_processors(config, tmp_path / "checkpoint", pi_stats(kind), tokenizer=tokenizer)
    saved = json.loads((directory / "policy_preprocessor.json").read_text())
    names = [step["config"].get("tokenizer_name") for step in saved["steps"] if step["registry_name"] == "tokenizer_processor"]
    assert names == [str(tokenizer)], "the saved pipeline must name the local tokenizer, not the hub's"
    # Loaded back as policylink's loader does, with no patch in place.
    pre, _ = make_pre_post_processors(config, pretrained_path=str(directory), preprocessor_overrides={"device_processor": {"device": "cpu"}})
    red = pre(lerobot_batch(observation(0), TASK))
    blue = pre(lerobot_batch(observation(0), "stack the blue cubes"))
    tokens, mask = red[OBS_LANGUAGE_TOKENS][0], red[OBS_LANGUAGE_ATTENTION_MASK][0]
    used = int(mask.sum())
    assert tokens.shape == (config.tokenizer_max_length,) and 0 < used < len(tokens), "the whole prompt fits, padded on the right"
    assert tokens[0] == BOS and (tokens[used:] == PAD).all() and UNK not in tokens[:used].tolist()
    assert not torch.equal(tokens, blue[OBS_LANGUAGE_TOKENS][0]), "the prompt must reach the tokens"
    if kind == "pi05":  # the state travels in the prompt as 0-255 bins
        other_state = pre(lerobot_batch(observation(1), TASK))
        assert not torch.equal(tokens, other_state[OBS_LANGUAGE_TOKENS][0])


# -- the models, served (LeRobot's patched transformers and ~34 GiB of memory) ---------------------------


@dataclasses.dataclass
class Served:
    kind: str
    directory: Path
    server: BackgroundServer
    #: LeRobot's own chunk (no policylink) for ``observation(1)`` and :data:`TASK`, torch seeded with 0.
    expected: np.ndarray


@pytest.fixture(scope="module", params=KINDS)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A server with an idle engine (clients configure the checkpoint); one kind at a time, ~14 GB each."""
    kind = request.param
    directory = request.getfixturevalue(f"{kind}_dir")
    # LeRobot's own result first, then the server: the process never holds two copies of the weights.
    expected = run_in_process(directory, lerobot_batch(observation(1), TASK), seed=0)
    release_memory()
    server = BackgroundServer(Engine(None, loader=load_from_request), host="127.0.0.1").start()
    yield Served(kind, directory, server, expected)
    server.stop()
    release_memory()


@SLOW
def test_configure_loads_the_checkpoint_and_serves_chunks(served):
    with PolicyClient(served.server.url) as client:
        meta = client.configure(str(served.directory), device="cpu")
        assert (meta.policy_type, meta.horizon, meta.action_dim, meta.camera_names) == (served.kind, 8, 6, ("front",))
        assert meta.rtc is not None, "a flow-matching policy announces real-time chunking"
        frame = np.zeros((480, 640, 3), np.uint8)  # a camera frame, resized by the server
        chunk = np.asarray(client.infer({"observation/state": np.zeros(6, np.float32), "observation/image": frame, "prompt": TASK}))
    assert chunk.shape == (8, 6) and chunk.dtype == np.float32 and np.isfinite(chunk).all()


@SLOW
def test_served_chunk_is_lerobots_own_and_reads_the_prompt(served):
    obs = {**observation(1), "task": TASK}
    with PolicyClient(served.server.url) as client:
        client.configure(str(served.directory), device="cpu")
        # Flow matching starts from noise: seed torch's global generator, which the server thread draws from.
        torch.manual_seed(0)
        red = np.asarray(client.infer(obs))
        torch.manual_seed(0)
        blue = np.asarray(client.infer({**obs, "task": "stack the blue cubes"}))
    np.testing.assert_allclose(red, served.expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(red, blue, atol=1e-4), "the prompt must reach the model through the tokenizer"
    assert served.server.engine.models.loads == 1, "every client of the checkpoint shares one loaded model"


@SLOW
def test_rtc_guidance_pulls_the_new_chunk_towards_the_remainder(served):
    obs = {**observation(2), "task": TASK}
    with PolicyClient(served.server.url) as client:
        client.configure(str(served.directory), device="cpu")
        free = np.asarray(client.infer({**obs, SEED_KEY: 5}))
        again = np.asarray(client.infer({**obs, SEED_KEY: 5}))
        # A remainder far from the unguided chunk: 40 action units (4 std of the made-up statistics) away.
        remainder = (free[:6] + 40.0).astype(np.float32)
        guided = np.asarray(client.infer({**obs, SEED_KEY: 5, RTC_KEY: {"prefix": remainder, "delay": 2, "execution_horizon": 4}}))
    np.testing.assert_allclose(free, again, atol=1e-5, err_msg="the same seed must give the same noise")
    assert np.isfinite(guided).all()
    # The unguided chunk is 40 away; guidance pulls the first `delay` steps onto the remainder.
    assert gap(guided, remainder, 2) < 0.1 * gap(free, remainder, 2), "guidance must pull the first `delay` steps to the remainder"
