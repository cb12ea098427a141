"""End to end: ``policylink run --monitor --record`` on the fake environment against a real server.

The page is watched in headless Chromium while the run goes on (its Stop
button pauses the real executor, Start resumes it), the session folder is
complete, its export loads as a LeRobot dataset, and the server's metrics
report the traffic.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from policylink.cli import main
from policylink.policies.builtin import ReplayPolicy

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def updates(url: str) -> Iterator[dict[str, Any]]:
    """The monitor's ``update`` server-sent events, as it sends them (one every 1 / update_hz s)."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=10)
    try:
        conn.request("GET", "/events")
        response = conn.getresponse()
        assert response.status == 200
        name = ""
        while True:
            line = response.readline().decode().rstrip("\n")
            if not line and response.isclosed():
                return
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "update":
                yield json.loads(line[6:])
    finally:
        conn.close()


def page_token(url: str) -> str:
    """The monitor session's token, as a script gets it: from the page's ``<meta name="policylink-token">``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        match = re.search(r'<meta name="policylink-token" content="([^"]+)">', response.read().decode())
    assert match, "the page carries no token"
    return match.group(1)


def post(url: str, token: str) -> Any:
    request = urllib.request.Request(url, method="POST", data=b"", headers={"X-Policylink-Token": token})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='policylink-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class PageDriver:
    """The monitor's buttons, clicked in Chromium when it is installed, else posted over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.browser = chromium() if CHROMIUM and CHROMEDRIVER else None
        if self.browser is not None:
            self.browser.get(url)

    def js(self, script: str) -> Any:
        assert self.browser is not None
        return self.browser.execute_script(f"return {script};")

    def click(self, action: str) -> None:
        if self.browser is None:
            post(self.url + f"api/{action}", page_token(self.url))
            return
        from selenium.webdriver.common.by import By

        self.browser.find_element(By.ID, f"btn-{action}").click()
        wait_for(lambda: f"{action}: ok" in self.browser.find_element(By.ID, "message").text, f"the page to confirm {action}")

    def close(self) -> None:
        if self.browser is not None:
            self.browser.quit()


def test_run_with_monitor_and_record(serve: Any, tmp_path: Path, capsys: Any) -> None:
    server = serve(ReplayPolicy(action_dim=6, horizon=16, cameras={"front": (96, 128), "wrist": (96, 128)}))
    port = free_port()
    argv = ["run", "--server", server.url, "--env.cameras", "front,wrist", "--env.image_size", "96x128", "--env.episode_steps", "60",
            "--episodes", "2", "--mode", "async", "--monitor", str(port), "--record", str(tmp_path / "out")]
    exit_codes: list[int] = []
    run = threading.Thread(target=lambda: exit_codes.append(main(argv)), daemon=True)
    run.start()
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: _answers(url + "api/status"), "the monitor to answer")
    wait_for(lambda: get_json(url + "api/status")["step"] >= 5, "the first steps")

    # Pause the real executor from the page, check it holds, resume it.
    page = PageDriver(url)
    try:
        if page.browser is not None:
            wait_for(lambda: page.js("window.monitor.framesLoaded") >= 2, "camera frames in the page")
            wait_for(lambda: page.js("window.monitor.samples.length") > 10 and page.js("window.monitor.chunk !== null"), "plotted steps and a chunk")
            ARTIFACTS.mkdir(exist_ok=True)
            page.browser.save_screenshot(str(ARTIFACTS / "monitor-run.png"))
        page.click("stop")
        wait_for(lambda: get_json(url + "api/status")["loop"]["state"] == "paused", "the executor to pause")
        if page.browser is not None:
            wait_for(lambda: page.js("document.getElementById('running').textContent") == "paused", "the page to show the pause")
        paused_at = get_json(url + "api/status")["loop"]["step"]
        # Timed by the monitor's own update stream: the first update brings the history, each of
        # the next ones what is new since the one before (0.5 s, 15 control periods in all).
        stream = updates(url)
        try:
            history = next(stream)
            # The monitor shows its last step event's step: events number steps from 0, so one less than the
            # executor's count of steps taken (0 when the pause came at an episode's start). It stays put too.
            shown_step = history["status"]["step"]
            assert history["loop"]["step"] == paused_at and shown_step == max(paused_at - 1, 0)
            for _ in range(5):
                update = next(stream)
                assert update["samples"] == [] and update["loop"]["step"] == paused_at, "the executor stepped while paused"
                assert update["loop"]["state"] == "paused" and update["status"]["step"] == shown_step
        finally:
            stream.close()
        page.click("start")
        run.join(60)
    finally:
        page.close()
    assert not run.is_alive() and exit_codes == [0]
    assert f"policylink: monitor on {url}" in capsys.readouterr().out

    # The session folder is complete.
    (session,) = (tmp_path / "out").iterdir()
    metadata = json.loads((session / "metadata.json").read_text())
    assert metadata["policy"]["model_id"] == "builtin/replay" and metadata["server"] == server.url
    assert metadata["client"]["mode"] == "async" and metadata["client"]["fps"] == 30
    assert metadata["stats"]["steps"] == 120 and metadata["stats"]["frames_dropped"] == 0
    lines = [json.loads(line) for line in (session / "inference_log.jsonl").read_text().splitlines()]
    assert len(lines) == 120 and {line["episode"] for line in lines} == {0, 1}
    assert all((session / path).is_file() for line in lines for path in line["images"].values())
    chunks = (session / "chunks.jsonl").read_text().splitlines()

    # The server counted every chunk request (and the client's per-episode resets).
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as response:
        metrics = response.read().decode()
    match = re.search(r'^policylink_requests_total\{kind="infer",protocol="websocket"\} ([0-9.]+)$', metrics, re.M)
    assert match, metrics
    # An async request still in flight when an episode ends is answered (and counted) but never
    # becomes a chunk of that episode: at most one per episode.
    assert len(chunks) <= float(match.group(1)) <= len(chunks) + 2

    # The export loads as a LeRobot dataset.
    pytest.importorskip("lerobot")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    assert main(["export", str(session), str(tmp_path / "dataset"), "--repo-id", "local/run"]) == 0
    dataset = LeRobotDataset("local/run", root=tmp_path / "dataset")
    assert (dataset.num_episodes, dataset.num_frames, dataset.fps) == (2, 120, 30)
    assert tuple(dataset[0]["observation.images.wrist"].shape) == (3, 96, 128)


def _answers(url: str) -> bool:
    try:
        get_json(url)
    except OSError:
        return False
    return True
