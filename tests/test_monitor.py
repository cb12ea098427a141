"""The monitor: its HTTP/SSE interface and the page in a real headless Chromium.

A real server serves the built-in replay policy; a small real control loop
(tests/watch_loop.py) runs against it through PolicyClient and reports to the
monitor; the page's buttons act on that loop.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policylink.client import PolicyClient
from policylink.media import decode_jpeg
from policylink.monitor import Monitor
from policylink.policies.builtin import ReplayPolicy
from watch_loop import PictureEnv, TinyLoop, chromium

CAMERAS = {"front": (96, 128), "wrist": (72, 96)}
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def loop(serve: Any) -> Iterator[TinyLoop]:
    server = serve(ReplayPolicy(action_dim=6, horizon=16, cameras=CAMERAS))
    client = PolicyClient(server.url, timeout=10)
    tiny = TinyLoop(client, PictureEnv(CAMERAS), fps=30, n_steps=8)
    yield tiny
    tiny.close()
    client.close()


@pytest.fixture
def monitor(loop: TinyLoop) -> Iterator[Monitor]:
    with Monitor(control=loop, port=0, fps=30, info={"policy": "builtin/replay"}) as mon:
        loop.listeners.append(mon)
        yield mon


def read_events(url: str, count: int) -> list[tuple[str, dict[str, Any]]]:
    """The first ``count`` server-sent events of ``/events``."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/events")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    while len(events) < count:
        line = response.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    conn.close()
    return events


def post(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST as a script does: with the monitor session's token (when given), no Origin."""
    headers = {} if token is None else {"X-Policylink-Token": token}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b"", headers=headers)) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


#: Idle polls of the stopped loop to watch; each lasts TinyLoop.IDLE_POLL_S (50 ms), longer than a 30 fps control period.
STOPPED_POLLS = 6


def assert_stays_stopped(loop: TinyLoop) -> None:
    """After a stop, the step counter no longer moves (one step may have been in flight).

    Timed by the loop itself: once its thread polls the run flag (it only does
    so while stopped, so a step in flight at the stop is done), the counter
    must stay put over STOPPED_POLLS further polls, i.e. over more than
    STOPPED_POLLS control periods. A loop that kept stepping never polls, and
    the wait fails.
    """
    assert loop.status()["running"] is False
    loop.wait_idle_polls(1, timeout=10)
    settled = loop.steps
    loop.wait_idle_polls(STOPPED_POLLS, timeout=10)
    assert loop.steps == settled, "the loop kept stepping after stop"


def test_events_stream_steps_chunks_and_frames(loop: TinyLoop, monitor: Monitor) -> None:
    loop.start()
    loop.wait_steps(20)
    wait_for(lambda: monitor.state.jpeg("wrist") is not None, "an encoded wrist frame")
    events = read_events(monitor.url, 3)

    name, hello = events[0]
    assert name == "hello"
    assert set(hello["cameras"]) == set(CAMERAS)
    assert hello["controls"] is True and hello["fps"] == 30
    name, first = events[1]
    assert name == "update"
    assert len(first["samples"]) >= 20
    sample = first["samples"][-1]
    assert len(sample["state"]) == 6 and len(sample["action"]) == 6
    assert sample["chunk_id"] >= 1 and sample["fresh"] is True
    assert len(first["chunk"]["actions"]) == 16 and len(first["chunk"]["actions"][0]) == 6
    assert first["latencies"] and first["latencies"][-1]["roundtrip_ms"] > 0
    assert first["status"]["step"] >= 1 and first["loop"]["running"] is True
    assert set(first["frames"]) == set(CAMERAS)
    # The second update carries only what is new since the first.
    seen = {s["seq"] for s in first["samples"]}
    assert not seen & {s["seq"] for s in events[2][1]["samples"]}

    with urllib.request.urlopen(monitor.url + "frame/front.jpg") as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert decode_jpeg(response.read()).shape == (96, 128, 3)


def test_buttons_act_on_the_loop(loop: TinyLoop, monitor: Monitor) -> None:
    assert post(monitor.url + "api/start", monitor.token)[0] == 200
    loop.wait_steps(10)
    status, body = post(monitor.url + "api/reset", monitor.token)
    assert status == 200 and body["action"] == "reset"
    loop.wait_until(lambda: loop.episode >= 1, "the reset to start episode 1", timeout=20)

    status, body = post(monitor.url + "api/stop", monitor.token)
    assert status == 200 and body["loop"]["running"] is False
    assert_stays_stopped(loop)

    status, body = post(monitor.url + "api/launch", monitor.token)
    assert status == 404 and "unknown action 'launch'" in body["error"]


def test_monitor_without_control_refuses_buttons() -> None:
    with Monitor(port=0) as mon:
        status, body = post(mon.url + "api/stop", mon.token)
        assert status == 503 and "no loop control" in body["error"]
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(mon.url + "frame/front.jpg")
        assert info.value.code == 404
        page = urllib.request.urlopen(mon.url).read().decode()
        assert '<script src="/monitor.js">' in page and "http" not in page.split("<body>")[1]  # nothing from a CDN


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (make test installs them)")
def test_page_in_headless_chromium(loop: TinyLoop, monitor: Monitor) -> None:
    from selenium.webdriver.common.by import By

    with chromium() as driver:
        loop.start()
        driver.get(monitor.url)
        page = lambda script: driver.execute_script(f"return {script};")  # noqa: E731

        def frame_size(name: str) -> tuple[int, int]:
            """(height, width) of the frame the page shows for ``name``; (0, 0) before one has loaded."""
            return tuple(page(f"(() => {{ const img = document.querySelector('img[data-camera=\"{name}\"]');"
                              " return img ? [img.naturalHeight, img.naturalWidth] : [0, 0]; })()"))

        # Each camera's own frame: framesLoaded counts loads of any camera, so two could be one camera's.
        # The size is checked as read when the frame showed: while the next frame loads it reads (0, 0).
        shown: dict[str, tuple[int, int]] = {}

        def frame_shown(name: str) -> bool:
            shown[name] = frame_size(name)
            return shown[name][1] > 0

        for name, shape in CAMERAS.items():
            wait_for(lambda name=name: frame_shown(name), f"a {name} frame in the page")
            assert shown[name] == shape, f"the {name} frame has size {shown[name]}, expected {shape}"
        images = driver.find_elements(By.CSS_SELECTOR, "#cameras img")
        assert {img.get_attribute("data-camera") for img in images} == set(CAMERAS)

        # The plots update: more steps arrive and are drawn.
        drawn, step = page("window.monitor.plotsDrawn"), int(driver.find_element(By.ID, "step").text)
        wait_for(lambda: page("window.monitor.plotsDrawn") > drawn + 3 and int(driver.find_element(By.ID, "step").text or 0) != step, "plot updates")
        assert page("window.monitor.samples.length") > 10
        assert page("window.monitor.chunk.actions.length") == 16
        assert page("window.monitor.samples[window.monitor.samples.length - 1].action.length") == 6
        # The canvas has ink on it (not just the empty background).
        inked = page("(() => { const c = document.getElementById('plot-action'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                     " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })()")
        assert inked > 500
        wait_for(lambda: float(driver.find_element(By.ID, "rate").text or 0) > 0, "a loop rate")

        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "monitor.png"))

        driver.find_element(By.ID, "btn-stop").click()
        wait_for(lambda: driver.find_element(By.ID, "running").text == "stopped", "the page to show the loop stopped")
        assert_stays_stopped(loop)
        assert "stop: ok" in driver.find_element(By.ID, "message").text
        driver.save_screenshot(str(ARTIFACTS / "monitor-stopped.png"))
    assert os.path.getsize(ARTIFACTS / "monitor.png") > 10_000
