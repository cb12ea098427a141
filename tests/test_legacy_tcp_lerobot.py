"""A LeRobot checkpoint served to a legacy MetaObs / MetaAction client: its declared action space, LeRobot's own numbers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("lerobot")
pytestmark = pytest.mark.lerobot

import torch  # noqa: E402

from lerobot_checkpoints import act_dir, run_in_process  # noqa: E402,F401
from policylink.action_space import ActionSpace  # noqa: E402
from policylink.backends.lerobot import load_policy  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402
from policylink.server.legacy_tcp import LegacyTcpServer  # noqa: E402
from protocol_servers import running  # noqa: E402
from test_legacy_tcp import run_client  # noqa: E402


def test_the_checkpoints_policylink_json_reaches_legacy_clients_with_lerobots_own_actions(act_dir, tmp_path) -> None:
    checkpoint = tmp_path / "act"
    shutil.copytree(act_dir, checkpoint)
    declared = {"ctrl_space": "ee", "ctrl_type": "relative", "ctrl_absolute_dims": [-1], "gripper_continuous": True}
    (checkpoint / "policylink.json").write_text(json.dumps(declared))
    policy = load_policy(checkpoint, device="cpu")
    assert policy.metadata.control == ActionSpace("ee", "relative", (-1,), True)
    engine = Engine(policy)
    with running(engine, [LegacyTcpServer(engine, "127.0.0.1", 0)]) as (server,):
        replies = run_client(server.port, "five", cameras=1, state_dim=6)
    assert [r["count"] for r in replies] == [16] * 5
    assert all(r["ctrl_space"] == ["ee"] and r["ctrl_type"] == ["relative"] and r["gripper_continuous"] == [True] for r in replies)
    # The first MetaObs (state 0, camera seeded 0) through LeRobot's own load / pre-process / predict / post-process path.
    image = np.random.default_rng(0).integers(0, 256, (1, 3, 48, 64), dtype=np.uint8)
    batch = {"observation.state": torch.zeros(1, 6), "observation.images.front": torch.from_numpy(image).float() / 255.0}
    np.testing.assert_allclose(replies[0]["actions"], run_in_process(checkpoint, batch), rtol=1e-4, atol=1e-4)


def test_a_broken_policylink_json_is_refused_with_its_path(act_dir, tmp_path) -> None:
    from policylink.errors import RequestError

    checkpoint = tmp_path / "act"
    shutil.copytree(act_dir, checkpoint)
    (checkpoint / "policylink.json").write_text('{"ctrl_space": "ee", "ctrl_type": "velocity"}')
    with pytest.raises(RequestError, match="bad action space in .*policylink.json: unknown control type 'velocity'"):
        load_policy(checkpoint, device="cpu")
