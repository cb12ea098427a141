"""The monitor's buttons act only for its own page: session token, Origin and Host checks.

A real server serves the built-in replay policy and a small real control loop
(tests/watch_loop.py) runs against it. In a real headless Chromium, the
monitor's own page starts, resets and stops the loop; a page served from
another origin (a second http.server on 127.0.0.1, another port) tries a
plain cross-origin fetch, a no-cors fetch, a fetch with a guessed token
(which needs a CORS preflight) and an auto-submitting form, and the loop's
state does not change. Direct requests without the token, with a wrong one,
from another Origin or addressed to another host name are refused with 403.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from policylink.client import PolicyClient
from policylink.monitor import TOKEN_HEADER, Monitor
from policylink.policies.builtin import ReplayPolicy
from watch_loop import CHROMEDRIVER, CHROMIUM, NO_CHROMIUM, PictureEnv, TinyLoop, chromium, wait_for

CAMERAS = {"front": (48, 64)}
#: Idle polls of a stopped loop to watch (each lasts TinyLoop.IDLE_POLL_S, longer than a control period).
STOPPED_POLLS = 6


@pytest.fixture
def loop(serve: Any) -> Iterator[TinyLoop]:
    server = serve(ReplayPolicy(action_dim=6, horizon=16, cameras=CAMERAS))
    client = PolicyClient(server.url, timeout=10)
    # Episodes long enough that only a reset request ends one while a test runs.
    tiny = TinyLoop(client, PictureEnv(CAMERAS, episode_steps=100_000), fps=30, n_steps=8)
    yield tiny
    tiny.close()
    client.close()


@pytest.fixture
def monitor(loop: TinyLoop) -> Iterator[Monitor]:
    with Monitor(control=loop, port=0, fps=30) as mon:
        loop.listeners.append(mon)
        yield mon


def request(monitor: Monitor, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request to the monitor: headers exactly as given (a ``Host`` replaces the real one)."""
    conn = http.client.HTTPConnection(monitor.host, monitor.port, timeout=10)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None, headers=headers or {})
        response = conn.getresponse()
        return response.status, {key.lower(): value for key, value in response.getheaders()}, response.read()
    finally:
        conn.close()


def refused(status: int, body: bytes, reason: str, words: str) -> bool:
    answer = json.loads(body)
    assert status == 403 and answer["refused"] == reason and words in answer["error"], (status, answer)
    return True


def assert_stays_stopped(loop: TinyLoop) -> None:
    """The stopped loop polls its run flag STOPPED_POLLS times (more than as many control periods) without a step."""
    assert loop.status()["running"] is False
    loop.wait_idle_polls(1, timeout=10)
    settled = loop.steps
    loop.wait_idle_polls(STOPPED_POLLS, timeout=10)
    assert loop.steps == settled, "the loop kept stepping after stop"


# -- direct requests ------------------------------------------------------------


def test_posts_need_the_token_and_the_monitors_own_origin(loop: TinyLoop, monitor: Monitor) -> None:
    own = f"http://127.0.0.1:{monitor.port}"
    token = {TOKEN_HEADER: monitor.token}
    attempts = [
        ({}, "token", "missing X-Policylink-Token"),
        ({TOKEN_HEADER: "guessed"}, "token", "wrong X-Policylink-Token"),
        ({TOKEN_HEADER: monitor.token[:-1]}, "token", "wrong X-Policylink-Token"),
        ({TOKEN_HEADER: "guessed", "Origin": own}, "token", "wrong X-Policylink-Token"),
        ({**token, "Origin": "http://127.0.0.1:1"}, "origin", "Origin 'http://127.0.0.1:1' is not this monitor's origin"),
        ({**token, "Origin": "https://evil.example"}, "origin", "is not this monitor's origin"),
        ({**token, "Origin": "null"}, "origin", "Origin 'null'"),
        ({**token, "Sec-Fetch-Site": "cross-site"}, "origin", "Sec-Fetch-Site is 'cross-site'"),
        ({**token, "Sec-Fetch-Site": "same-site"}, "origin", "Sec-Fetch-Site is 'same-site'"),
        ({**token, "Referer": "http://127.0.0.1:1/attack.html"}, "origin", "Referer"),
        ({**token, "Host": f"evil.example:{monitor.port}", "Origin": f"http://evil.example:{monitor.port}"}, "host", "host 'evil.example"),
    ]
    for headers, reason, words in attempts:
        status, _, body = request(monitor, "POST", "/api/start", headers)
        assert refused(status, body, reason, words)
    # A CORS preflight (what a cross-origin fetch with the token header needs first) is never approved.
    status, headers, body = request(monitor, "OPTIONS", "/api/start", {"Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "POST",
                                                                       "Access-Control-Request-Headers": TOKEN_HEADER.lower()})
    assert refused(status, body, "preflight", "CORS preflight from http://127.0.0.1:1")
    assert not [key for key in headers if key.startswith("access-control-")]

    # None of them acted: the loop never started.
    assert loop.status()["running"] is False and loop.steps == 0
    counts = monitor.refusals()
    assert counts["total"] == len(attempts) + 1
    assert counts["by_reason"] == {"token": 4, "origin": 6, "host": 1, "preflight": 1}
    status, _, body = request(monitor, "GET", "/api/status")
    assert status == 200 and json.loads(body)["refused"]["total"] == len(attempts) + 1

    # The token with the monitor's own origin (the page), or with no browser headers at all (a script), acts.
    status, _, body = request(monitor, "POST", "/api/start", {**token, "Origin": own, "Sec-Fetch-Site": "same-origin", "Referer": own + "/"})
    assert status == 200 and json.loads(body)["loop"]["running"] is True
    loop.wait_steps(3)
    status, _, body = request(monitor, "POST", "/api/stop", {**token, "Host": f"localhost:{monitor.port}", "Origin": f"http://localhost:{monitor.port}"})
    assert status == 200 and json.loads(body)["loop"]["running"] is False
    status, _, body = request(monitor, "POST", "/api/launch", token)
    assert status == 404 and "unknown action 'launch'" in json.loads(body)["error"]
    assert monitor.refusals()["total"] == len(attempts) + 1


def test_the_token_is_only_in_the_page(monitor: Monitor) -> None:
    status, headers, body = request(monitor, "GET", "/")
    page = body.decode()
    assert status == 200 and f'<meta name="policylink-token" content="{monitor.token}">' in page
    assert len(monitor.token) >= 40 and "__POLICYLINK_TOKEN__" not in page
    # No other page can frame it (clickjacking the buttons), nothing caches it, nothing reads it cross-origin.
    assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store" and "access-control-allow-origin" not in headers
    # Each monitor has a token of its own.
    with Monitor(port=0) as other:
        assert other.token != monitor.token
    # The other GET answers do not carry it.
    for path in ("/monitor.js", "/api/status", "/frame/front.jpg", "/nothing"):
        assert monitor.token.encode() not in request(monitor, "GET", path)[2]
    conn = http.client.HTTPConnection(monitor.host, monitor.port, timeout=10)
    try:
        conn.request("GET", "/events")
        events = conn.getresponse()
        stream = events.readline() + events.readline() + events.readline() + events.readline()  # hello, then the first update
        assert stream.startswith(b"event: hello") and b"event: update" in stream and monitor.token.encode() not in stream
    finally:
        conn.close()
    # A page fetched under another host name (a DNS name re-pointed at this machine) gets no token.
    status, _, body = request(monitor, "GET", "/", {"Host": f"evil.example:{monitor.port}"})
    assert refused(status, body, "host", "not an address of this monitor") and monitor.token.encode() not in body


def test_allowed_host_names(loop: TinyLoop) -> None:
    """Names the operator reaches the machine by (``--monitor-allow-host``) are accepted; others are not."""
    with Monitor(control=loop, port=0, allowed_hosts=["Robot-7.lab."]) as mon:
        name = f"robot-7.lab:{mon.port}"
        status, _, body = request(mon, "GET", "/", {"Host": name})
        assert status == 200 and mon.token.encode() in body
        status, _, body = request(mon, "POST", "/api/start", {"Host": name, "Origin": f"http://{name}", TOKEN_HEADER: mon.token})
        assert status == 200 and loop.status()["running"] is True
        status, _, body = request(mon, "POST", "/api/stop", {"Host": f"robot-8.lab:{mon.port}", TOKEN_HEADER: mon.token})
        assert refused(status, body, "host", "robot-8.lab") and loop.status()["running"] is True
        # This machine's own name is always accepted.
        assert request(mon, "GET", "/", {"Host": f"{socket.gethostname()}:{mon.port}"})[0] == 200


# -- in the browser -------------------------------------------------------------


ATTACK_PAGE = """<!doctype html>
<html><body>
<h1>an innocent page</h1>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="POST" action="{monitor}api/stop" target="sink"><input type="hidden" name="action" value="stop"></form>
<script>
"use strict";
const monitor = "{monitor}";
const results = {{}};
async function attempt(name, run) {{
  try {{ const response = await run(); results[name] = response.type === "opaque" ? "opaque answer" : `read ${{response.status}}`; }}
  catch (error) {{ results[name] = `failed: ${{error.name}}`; }}
}}
(async () => {{
  // Simple requests: sent without a preflight, so they reach the monitor.
  await attempt("fetch", () => fetch(monitor + "api/stop", {{ method: "POST" }}));
  await attempt("fetch_no_cors", () => fetch(monitor + "api/stop", {{ method: "POST", mode: "no-cors" }}));
  // A custom header needs a CORS preflight first.
  await attempt("fetch_guessed_token", () => fetch(monitor + "api/stop", {{ method: "POST", headers: {{ "X-Policylink-Token": "guessed" }} }}));
  // Reading the page (and its token) or the status from here.
  await attempt("read_page", async () => {{ const r = await fetch(monitor); results.page_text = await r.text(); return r; }});
  await attempt("read_status", async () => {{ const r = await fetch(monitor + "api/status"); await r.json(); return r; }});
  // An auto-submitting form, answered into the iframe.
  await new Promise((resolve) => {{ document.getElementById("sink").onload = resolve; document.getElementById("form").submit(); }});
  results.form = "answered";
  await fetch("/done", {{ method: "POST", body: JSON.stringify(results) }});
}})();
</script>
</body></html>
"""


class AttackerSite:
    """Another origin: a second http.server on 127.0.0.1 (another port) serving a page aimed at the monitor.

    The page POSTs what happened to each attempt to ``/done`` once every one of
    them has been answered; :attr:`done` is set then.
    """

    def __init__(self, monitor_url: str) -> None:
        self.page = ATTACK_PAGE.format(monitor=monitor_url).encode()
        self.done = threading.Event()
        self.results: dict[str, Any] = {}
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._answer(site.page, "text/html; charset=utf-8")

            def do_POST(self) -> None:  # noqa: N802
                site.results = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._answer(b"{}", "application/json")
                site.done.set()

            def _answer(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_CHROMIUM)
def test_page_buttons_act_and_requests_without_the_page_do_not(loop: TinyLoop, monitor: Monitor) -> None:
    from selenium.webdriver.common.by import By

    with chromium() as driver:
        driver.get(monitor.url)
        message = lambda: driver.find_element(By.ID, "message").text  # noqa: E731
        wait_for(lambda: driver.execute_script("return window.monitor.updates") > 0, "the page's first update")

        driver.find_element(By.ID, "btn-start").click()
        loop.wait_until(lambda: loop.steps >= 10, "the page's Start to run the loop")
        wait_for(lambda: "start: ok" in message(), "the page to confirm start")

        driver.find_element(By.ID, "btn-reset").click()
        loop.wait_until(lambda: loop.episode >= 1, "the page's Reset to start episode 1")
        wait_for(lambda: "reset: ok" in message(), "the page to confirm reset")

        driver.find_element(By.ID, "btn-stop").click()
        wait_for(lambda: "stop: ok" in message(), "the page to confirm stop")
        assert_stays_stopped(loop)
        wait_for(lambda: driver.find_element(By.ID, "running").text == "stopped", "the page to show the loop stopped")
        assert monitor.refusals()["total"] == 0, monitor.refusals()

        # The page's request without the page's token: refused, and the loop stays stopped.
        origin = monitor.url.rstrip("/")
        status, _, body = request(monitor, "POST", "/api/start", {"Origin": origin, "Sec-Fetch-Site": "same-origin"})
        assert refused(status, body, "token", "missing X-Policylink-Token")
        assert_stays_stopped(loop)
        # The page says so.
        wait_for(lambda: "refused 1 request" in driver.find_element(By.ID, "warnings").text, "the page to report the refused request")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_CHROMIUM)
def test_a_page_from_another_origin_cannot_act(loop: TinyLoop, monitor: Monitor) -> None:
    loop.start()
    loop.wait_steps(5)
    episode = loop.episode
    attacker = AttackerSite(monitor.url)
    assert urllib.parse.urlsplit(attacker.url).port != monitor.port
    try:
        with chromium() as driver:
            driver.get(attacker.url)
            assert attacker.done.wait(30), "the attacker page never finished its attempts"
    finally:
        attacker.close()

    # Every attempt was answered, none could read the answer (nor the page's token).
    results = attacker.results
    assert results["fetch"] == "failed: TypeError" and results["fetch_no_cors"] == "opaque answer"
    assert results["fetch_guessed_token"] == "failed: TypeError"
    assert results["read_page"] == "failed: TypeError" and "page_text" not in results
    assert results["read_status"] == "failed: TypeError" and results["form"] == "answered"

    # The loop did not stop: still running, same episode, still stepping.
    assert loop.status()["running"] is True and loop.episode == episode
    steps = loop.steps
    loop.wait_steps(steps + 5)
    # The monitor refused them: the two fetches and the form for their Origin, the guessed token at its preflight.
    counts = monitor.refusals()["by_reason"]
    assert counts.get("origin", 0) >= 3 and counts.get("preflight", 0) >= 1, counts
    assert "token" not in counts, "the request with the guessed token was sent: its preflight was approved"
    assert f"Origin '{attacker.url.rstrip('/')}' is not this monitor's origin" in monitor.refusals()["last"]
