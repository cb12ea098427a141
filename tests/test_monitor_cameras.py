"""Camera names on the monitor: escaped consistently, or refused where no URL can carry them.

The page fetches a camera's frame at ``/frame/<name>.jpg`` with the name
percent-encoded (``encodeURIComponent``) and shows the name as text; the
server decodes it back. So names with slashes, ``..``, spaces, quotes, markup,
URL syntax or non-ASCII letters are shown, each with its own frame, in a real
headless Chromium. Names that cannot round-trip (empty, too long, control or
invisible formatting characters, unpaired surrogates) are refused where the
monitor first sees them: listed in the status and on the page, never served.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from policylink.client import PolicyClient
from policylink.monitor import MAX_CAMERA_NAME, Monitor, camera_name_problem
from policylink.monitor.state import MonitorState
from policylink.policies.builtin import ReplayPolicy
from policylink.runtime.events import StepEvent
from watch_loop import CHROMEDRIVER, CHROMIUM, NO_CHROMIUM, PictureEnv, TinyLoop, chromium, wait_for

#: Names the page addresses: each camera has a size of its own, so a test can tell whose frame it shows.
SHOWN = {
    'wrist cam/../ü "q" \'x\'': (40, 56),
    "..": (44, 60),
    "a/b?c#d%20&e=+;": (48, 64),
    "constructor": (36, 52),
    "<b>前</b>": (32, 48),
    "front": (52, 68),
}
#: Names it cannot: refused, with the reason.
REFUSED = {
    "bidi\u202eevil": "invisible formatting character (U+202E)",
    "nul\x00byte": "control character (U+0000)",
    "x" * (MAX_CAMERA_NAME + 1): f"longer than {MAX_CAMERA_NAME} characters",
}


def test_which_names_the_page_can_address() -> None:
    for name in [*SHOWN, "__proto__", "caméra 1", "..%2F..", "x" * MAX_CAMERA_NAME, "tab-free name with spaces"]:
        assert camera_name_problem(name) is None, name
    for name, why in [*REFUSED.items(), ("", "empty"), ("tab\there", "control character (U+0009)"), ("zero\u200bwidth", "formatting character (U+200B)"),
                      ("lone\ud800surrogate", "surrogate character (U+D800)"), ("\ue000private", "private-use"), (7, "not a string (int)")]:
        problem = camera_name_problem(name)
        assert problem is not None and why in problem, (name, problem)


def test_refused_names_are_listed_and_not_served() -> None:
    state = MonitorState()
    frame = np.zeros((8, 8, 3), np.uint8)
    obs = {f"observation.images.{name}": frame for name in ["front", *REFUSED]}
    for step in range(3):
        state.on_step(StepEvent(0, step, float(step), obs, np.zeros(2), 1, True))
    assert state.cameras() == ["front"]
    assert state.status()["cameras_refused"] == {ascii(name): why_full for name, why_full in
                                                 ((name, camera_name_problem(name)) for name in REFUSED)}
    state.encode_frames()
    assert state.jpeg("front") is not None and all(state.jpeg(name) is None for name in REFUSED)


@pytest.fixture
def loop(serve: Any) -> Iterator[TinyLoop]:
    cameras = {**SHOWN, **{name: (24, 32) for name in REFUSED}}
    server = serve(ReplayPolicy(action_dim=6, horizon=16, cameras={"front": (52, 68)}))
    client = PolicyClient(server.url, timeout=10)
    tiny = TinyLoop(client, PictureEnv(cameras, episode_steps=100_000), fps=30, n_steps=8)
    yield tiny
    tiny.close()
    client.close()


def get(monitor: Monitor, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(monitor.host, monitor.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_CHROMIUM)
def test_every_addressable_camera_is_shown_in_the_browser(loop: TinyLoop) -> None:
    with Monitor(control=loop, port=0, fps=30) as monitor, chromium() as driver:
        loop.listeners.append(monitor)
        loop.start()
        driver.get(monitor.url)

        def shown(name: str) -> Any:
            """(height, width, caption) of the frame the page shows for ``name``, once one has loaded."""
            return driver.execute_script(
                "const img = Array.from(document.querySelectorAll('#cameras img')).find((img) => img.dataset.camera === arguments[0]);"
                " return img && img.naturalWidth ? [img.naturalHeight, img.naturalWidth, img.nextElementSibling.textContent] : null;", name)

        for name, (height, width) in SHOWN.items():
            size = wait_for(lambda name=name: shown(name), f"the frame of camera {name!r} in the page")
            assert size == [height, width, name], f"camera {name!r} shows {size}"
        # The names are text, not markup; the refused cameras have no picture and are named in the warnings.
        assert driver.execute_script("return document.querySelectorAll('#cameras b').length") == 0
        assert driver.execute_script("return document.querySelectorAll('#cameras img').length") == len(SHOWN)
        warnings = wait_for(lambda: driver.execute_script("return document.getElementById('warnings').textContent"), "the refused cameras on the page")
        for name, why in REFUSED.items():
            assert f"camera {ascii(name)} not shown" in warnings and why in warnings

        # Over HTTP: each name percent-encoded as the page does finds its own frame; refused ones find none.
        for name, (height, width) in SHOWN.items():
            status, body = get(monitor, f"/frame/{urllib.parse.quote(name, safe='')}.jpg")
            assert status == 200 and body[:2] == b"\xff\xd8", name
        for name in REFUSED:
            status, body = get(monitor, f"/frame/{urllib.parse.quote(name, safe='')}.jpg")
            assert status == 404, name
        assert get(monitor, "/frame/%ff%fe.jpg")[0] == 404  # not UTF-8
        status, body = get(monitor, "/api/status")
        assert set(json.loads(body)["cameras_refused"]) == {ascii(name) for name in REFUSED}
