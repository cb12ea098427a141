"""``--monitor`` / ``--record`` as the commands wire them (cli/_watch.py)."""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port
from policylink.cli._watch import Watchers, add_watch_flags
from policylink.client import PolicyClient
from policylink.monitor import Monitor
from policylink.policies.builtin import ReplayPolicy
from policylink.record import SessionRecorder
from watch_loop import PictureEnv, TinyLoop


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_watch_flags(parser)
    return parser.parse_args(argv)


def test_flag_defaults() -> None:
    assert parse().monitor is None and parse().record is None
    assert parse("--monitor").monitor == 9000
    args = parse("--monitor", "9100", "--record", "out/")
    assert args.monitor == 9100 and args.record == Path("out/") and args.monitor_host == "127.0.0.1" and args.monitor_allow_host == []
    assert parse("--monitor-allow-host", "robot.lab", "--monitor-allow-host", "proxy.lab").monitor_allow_host == ["robot.lab", "proxy.lab"]


def test_monitor_allow_host_reaches_the_monitor() -> None:
    """``--monitor-allow-host NAME``: the page and its buttons answer requests addressed to NAME; other names get 403."""
    import http.client

    with Watchers(parse("--monitor", str(free_port()), "--monitor-allow-host", "robot-7.lab")) as watchers:
        monitor = watchers.monitor
        assert monitor is not None

        def status_for(host: str) -> int:
            conn = http.client.HTTPConnection(monitor.host, monitor.port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Host": f"{host}:{monitor.port}"})
                return conn.getresponse().status
            finally:
                conn.close()

        assert status_for("robot-7.lab") == 200 and status_for("127.0.0.1") == 200 and status_for("localhost") == 200
        assert status_for("robot-8.lab") == 403


def test_watchers_monitor_and_record_a_real_loop(serve: Any, tmp_path: Path) -> None:
    cameras = {"front": (48, 64)}
    server = serve(ReplayPolicy(action_dim=6, horizon=16, cameras=cameras))
    port = free_port()
    args = parse("--monitor", str(port), "--record", str(tmp_path))
    with Watchers(args, metadata={"server": server.url, "policy": {"model_id": "builtin/replay"}}, fps=30) as watchers:
        assert [type(w) for w in watchers.listeners] == [Monitor, SessionRecorder]
        assert watchers.monitor is not None and watchers.monitor.url == f"http://127.0.0.1:{port}/"
        with PolicyClient(server.url) as client:
            loop = TinyLoop(client, PictureEnv(cameras), fps=100, max_steps=25)
            loop.listeners.extend(watchers.listeners)
            watchers.attach(loop)
            request = urllib.request.Request(watchers.monitor.url + "api/start", method="POST", data=b"", headers={"X-Policylink-Token": watchers.monitor.token})
            with urllib.request.urlopen(request) as response:
                assert json.load(response)["ok"] is True
            loop.wait_steps(25)
            loop.close()
        assert watchers.recorder is not None
        session = watchers.recorder.path
    metadata = json.loads((session / "metadata.json").read_text())
    assert metadata["server"] == server.url and metadata["stats"]["steps"] == 25
    assert len((session / "inference_log.jsonl").read_text().splitlines()) == 25
    assert (session / "images" / "frame_000024" / "front.jpg").is_file()


def test_eval_records_and_monitors_its_episodes(tmp_path: Path, capsys: Any) -> None:
    """``policylink eval --record --monitor``: the simulator's episodes go through the same listeners."""
    import pytest

    pytest.importorskip("gym_pusht")
    from policylink.cli import main

    port = free_port()
    argv = ["eval", "--env", "pusht", "--policy.type", "random", "--episodes", "2", "--max-steps", "12", "--no-progress",
            "--out", str(tmp_path / "eval"), "--record", str(tmp_path / "sessions"), "--monitor", str(port)]
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert f"policylink: monitor on http://127.0.0.1:{port}/" in output
    (session,) = (tmp_path / "sessions").iterdir()
    lines = [json.loads(line) for line in (session / "inference_log.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [0] * 12 + [1] * 12
    assert len(lines[0]["state"]) == 2 and len(lines[0]["action"]) == 2 and lines[0]["fresh"] is True
    assert (session / lines[-1]["images"]["image"]).is_file()
    metadata = json.loads((session / "metadata.json").read_text())
    assert metadata["client"]["fps"] == 10 and metadata["policy"]["model_id"] and metadata["stats"]["frames_dropped"] == 0
    assert [episode["steps"] for episode in metadata["episodes"]] == [12, 12]
