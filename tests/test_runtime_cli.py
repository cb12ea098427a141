"""``policylink run`` and the control-loop part of ``policylink demo``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from policylink.cli import main
from policylink.policies.builtin import ReplayPolicy

SMALL = ["--env.image_size", "24x32", "--env.episode_steps", "30", "--fps", "60"]


def summary_numbers(text: str) -> dict[str, float]:
    stalls = re.search(r"stalls\s+(\d+) \((\d+) ticks", text)
    chunks = re.search(r"chunks\s+(\d+) accepted, (\d+) rejected", text)
    rate = re.search(r"over (\d+) ticks, (\d+) episode", text)
    assert stalls and chunks and rate, text
    return {
        "stalls": int(stalls[1]), "stalled_ticks": int(stalls[2]), "chunks": int(chunks[1]),
        "rejected": int(chunks[2]), "ticks": int(rate[1]), "episodes": int(rate[2]),
    }


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_run_with_a_local_builtin_policy(capsys, mode):
    # Async asks when 12 of 16 actions (200 ms at 60 Hz) are left: ample for a 60 ms policy.
    code = main(["run", "--policy.type", "replay", "--policy.latency_ms", "60", "--mode", mode, "--threshold", "0.75", "--episodes", "2", *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out
    numbers = summary_numbers(out)
    assert numbers["ticks"] == 60 and numbers["episodes"] == 2 and numbers["rejected"] == 0
    assert "roundtrip  p50" in out and "largest action jump at a chunk boundary" in out
    if mode == "async":
        assert numbers["stalls"] == 0
    else:
        assert numbers["stalls"] == numbers["chunks"] - 2  # one per chunk but each episode's first


def test_run_against_a_server_bimanual_with_filters_and_simulated_latency(serve, capsys):
    server = serve(ReplayPolicy(action_dim=12, horizon=16, cameras={"top": (24, 32)}))
    code = main([
        "run", "--server", server.url, "--env.layout", "bimanual", "--mode", "async", "--merge", "ensemble",
        "--sim-latency-steps", "3", "--filter.smooth", "2", "--filter.limits=-1,1", "--filter.max_delta", "0.2", *SMALL,
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    numbers = summary_numbers(out)
    assert numbers["stalls"] == 0 and numbers["ticks"] == 30


def test_run_names_a_shape_mismatch(serve, capsys):
    server = serve(ReplayPolicy(action_dim=6, horizon=16))
    assert main(["run", "--server", server.url, "--env.layout", "bimanual", *SMALL]) == 1
    assert "the policy returns 6-d actions but the fake environment takes 12" in capsys.readouterr().err


def test_run_needs_a_server_or_a_policy(capsys):
    assert main(["run", *SMALL]) == 1
    assert "give --server ws://host:port, or --policy.type / --policy.path" in capsys.readouterr().err


def test_run_replays_an_npz_episode(tmp_path, capsys):
    import numpy as np

    from policylink.policies.builtin import sine_trajectory

    trajectory = sine_trajectory(20, 6)
    np.savez(tmp_path / "episode.npz", state=trajectory, action=trajectory)
    episode = str(tmp_path / "episode.npz")  # the built-in replay policy serves the recorded actions back
    code = main(["run", "--policy.type", "replay", "--policy.actions", episode, "--env", "replay", "--env.path", episode, "--sim-latency-steps", "2", "--fps", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert summary_numbers(out)["ticks"] == 20
    assert "replay     last episode, 20 steps: mean |served - recorded| 0.00000, max 0.00000" in out


def test_demo_drives_the_fake_arm():
    out = subprocess.run(
        [sys.executable, "-m", "policylink", "demo", "--requests", "2", "--latency-ms", "10", "--loop-seconds", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "demo: driving a fake 6-d arm for 15 steps" in out.stdout
    assert summary_numbers(out.stdout)["ticks"] == 15
    assert "demo: done" in out.stdout


def test_run_records_every_step(tmp_path, capsys):
    code = main(["run", "--policy.type", "replay", "--record", str(tmp_path), "--sim-latency-steps", "1", *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out
    logs = list(tmp_path.glob("*/inference_log.jsonl"))
    assert len(logs) == 1
    assert len(logs[0].read_text().splitlines()) == 30  # the recorder heard every tick of the loop
