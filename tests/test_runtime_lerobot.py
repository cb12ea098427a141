"""``policylink run`` end to end with a real LeRobot ACT checkpoint (random weights) on a fake arm."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("lerobot")

from lerobot_checkpoints import act_dir  # noqa: E402,F401

from policylink.cli import main  # noqa: E402

pytestmark = pytest.mark.lerobot


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_run_drives_a_fake_arm_with_an_act_checkpoint(act_dir, capsys, mode):  # noqa: F811
    code = main([
        "run", "--policy.path", str(act_dir), "--device", "cpu", "--env.image_size", "48x64",
        "--env.episode_steps", "20", "--mode", mode, "--sim-latency-steps", "2", "--merge", "ensemble",
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"over 20 ticks, 1 episode", out)
    chunks = re.search(r"chunks\s+(\d+) accepted, 0 rejected", out)
    assert chunks and int(chunks[1]) >= 2
    stalls = int(re.search(r"stalls\s+(\d+)", out)[1])
    assert stalls == (0 if mode == "async" else int(chunks[1]) - 1)
