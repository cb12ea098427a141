"""The monitor's web server: one page, server-sent events, JPEG frames, buttons.

Standard library only (``http.server``), so the robot side needs nothing new:

- ``GET /``                 the page (``static/index.html`` + ``static/monitor.js``),
  with this monitor's session token in a ``<meta>`` tag
- ``GET /events``           server-sent events: a ``hello`` event with the
  configuration, then an ``update`` event every ``1 / update_hz`` seconds with
  the new steps, the latest chunk, latencies and the loop's status
- ``GET /frame/<camera>.jpg`` the camera's newest JPEG (the name percent-encoded)
- ``GET /api/status``       the loop's status as JSON
- ``POST /api/start``, ``/api/stop``, ``/api/reset`` act on the loop
  through its :class:`~policylink.runtime.events.LoopControl`

The buttons move a robot, and any web page open in the operator's browser can
send requests to ``127.0.0.1``. So every ``POST`` must

1. be addressed to a name of this machine (``Host``: an IP address,
   ``localhost``, this machine's host name, or an allowed name), so that a
   page whose domain was re-pointed at this address (DNS rebinding) cannot
   read the token or act;
2. come from the monitor's own page: its ``Origin`` (or, without one, its
   ``Sec-Fetch-Site`` / ``Referer``) must name the origin it was sent to;
3. carry the session token (``X-Policylink-Token``), a random secret made
   per :class:`Monitor` and embedded in the page, which another origin cannot
   read. It is compared in constant time.

A request failing any of them is answered ``403`` with the reason and
counted (:meth:`Monitor.refusals`). CORS preflights (``OPTIONS``) are refused
the same way, so a cross-origin ``fetch`` with custom headers never gets sent,
and no response carries ``Access-Control-Allow-*`` headers.

:class:`Monitor` bundles the listener, the HTTP server and the frame encoder.
"""

from __future__ import annotations

import collections
import functools
import hmac
import http
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ..runtime.events import ChunkEvent, EpisodeEvent, LoopControl, StepEvent
from .state import MonitorState

__all__ = ["Monitor", "DEFAULT_PORT", "TOKEN_HEADER"]

logger = logging.getLogger("policylink.monitor")

DEFAULT_PORT = 9000
#: The request header that carries the session token on every ``POST``.
TOKEN_HEADER = "X-Policylink-Token"
_TOKEN_PLACEHOLDER = b"__POLICYLINK_TOKEN__"
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/monitor.js": ("monitor.js", "text/javascript; charset=utf-8")}
_ACTIONS = ("start", "stop", "reset")
#: The page is framed by no one (clickjacking) and loads nothing from elsewhere.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
#: A button's request has no body; anything longer is refused unread.
_MAX_POST_BODY = 4096


class Monitor:
    """A live web page about a control loop; a loop listener.

    >>> monitor = Monitor(control=executor, port=9000).start()   # doctest: +SKIP
    >>> executor.add_listener(monitor)                          # doctest: +SKIP

    ``control`` (optional) is what the start / stop / reset buttons call.
    ``host`` defaults to 127.0.0.1: pass ``0.0.0.0`` to watch from another
    machine (the buttons then act for anyone who can reach the port and
    load the page). ``port=0`` picks a free port; :attr:`url` tells which.

    ``replay`` (optional) is a replayed episode (:class:`~policylink.envs.replay.ReplayEnv`,
    or anything with a ``last_recorded_action``): the page then shows the
    recorded action next to the served one, and their running mean difference.

    Requests must be addressed to an IP address, ``localhost``, this
    machine's name, ``host`` or one of ``allowed_hosts`` (names this machine
    is reached by, e.g. through a proxy); see the module's docstring for the
    rules every ``POST`` follows. :attr:`token` is the session token a script
    sends in the ``X-Policylink-Token`` header.
    """

    def __init__(
        self,
        control: LoopControl | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        title: str = "policylink monitor",
        fps: float | None = None,
        window_s: float = 10.0,
        update_hz: float = 10.0,
        frame_hz: float = 10.0,
        jpeg_quality: int = 80,
        info: dict[str, Any] | None = None,
        replay: Any = None,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.control = control
        self.replay = replay
        self.state = MonitorState(window_s=window_s, jpeg_quality=jpeg_quality)
        self.config = {"title": title, "fps": fps, "window_s": window_s, "update_hz": update_hz, "info": info or {},
                       "controls": control is not None, "replay": replay is not None}
        self.frame_hz = frame_hz
        #: The session's secret: every POST must carry it in the X-Policylink-Token header.
        self.token = secrets.token_urlsafe(32)
        self._page = (resources.files(__package__) / "static" / "index.html").read_bytes().replace(_TOKEN_PLACEHOLDER, self.token.encode())
        self._hosts = frozenset(_host_name(name) for name in (host, *allowed_hosts) if name and name.strip())
        self._refusals: collections.Counter[str] = collections.Counter()
        self._last_refusal = ""
        self._refusals_lock = threading.Lock()
        self._closing = threading.Event()
        try:
            self._httpd = _MonitorHTTPServer((host, port), _Handler, self)
        except OSError as exc:
            raise OSError(f"the monitor cannot listen on {host}:{port}: {exc.strerror or exc} (choose another port with --monitor PORT)") from None
        self._threads: list[threading.Thread] = []

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> Monitor:
        """Serve the page and encode frames on background threads."""
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="policylink-monitor-http", daemon=True),
            threading.Thread(target=self._encode_loop, name="policylink-monitor-jpeg", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if not self.state.can_encode:
            logger.warning("monitor: camera frames are not shown: JPEG encoding needs Pillow (pip install 'policylink[monitor]')")
        logger.info("monitor on %s", self.url)
        return self

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def show_replay(self, env: Any) -> None:
        """Compare the served actions with ``env``'s recorded ones (a replayed episode) on the page."""
        self.replay = env
        self.config["replay"] = env is not None

    # -- listener: forwarded to the state (control thread) ----------------

    def on_step(self, event: StepEvent) -> None:
        recorded = None
        if self.replay is not None and event.action is not None:
            # Read on the control thread right after the loop's env.step(action): the row that action was compared with.
            recorded = getattr(self.replay, "last_recorded_action", None)
        self.state.on_step(event, recorded=recorded)

    def on_chunk(self, event: ChunkEvent) -> None:
        self.state.on_chunk(event)

    def on_episode(self, event: EpisodeEvent) -> None:
        self.state.on_episode(event)

    # -- requests refused -------------------------------------------------

    def refusals(self) -> dict[str, Any]:
        """How many requests were refused (``total``, ``by_reason``) and why the last one was."""
        with self._refusals_lock:
            return {"total": sum(self._refusals.values()), "by_reason": dict(self._refusals), "last": self._last_refusal}

    def _refused(self, reason: str, message: str) -> None:
        with self._refusals_lock:
            self._refusals[reason] += 1
            self._last_refusal = message
            total = sum(self._refusals.values())
        # A hostile page may send many: log the first ones, then one in a hundred.
        if total <= 20 or total % 100 == 0:
            logger.warning("monitor: refused a request (%d so far): %s", total, message)

    def _host_allowed(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` names this machine (an IP address, localhost, its own or an allowed name)."""
        if not host_header:
            return False
        name = _split_host(host_header)
        if name is None:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name in self._hosts or name == "localhost" or name.endswith(".localhost") or name in _machine_names()
        return True

    # -- helpers for the handler ------------------------------------------

    def _encode_loop(self) -> None:
        period = 1.0 / self.frame_hz
        while not self._closing.wait(period):
            try:
                self.state.encode_frames()
            except Exception:  # a bad frame must not stop the monitor
                logger.exception("monitor: could not encode a frame")

    def loop_status(self) -> dict[str, Any]:
        if self.control is None:
            return {}
        try:
            return dict(self.control.status())
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    def act(self, action: str) -> dict[str, Any]:
        """Call ``start``/``stop``/``reset`` on the loop; returns its status after."""
        if self.control is None:
            raise LookupError("this monitor has no loop control attached")
        {"start": self.control.start, "stop": self.control.stop, "reset": self.control.reset_episode}[action]()
        logger.info("monitor: %s requested from the page", action)
        return self.loop_status()


def _split_host(value: str) -> str | None:
    """The lower-case host name or address of a ``Host`` header or URL netloc (``[::1]:9000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else None
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".") or None


def _host_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


@functools.lru_cache(maxsize=1)
def _machine_names() -> frozenset[str]:
    """This machine's host name and fully qualified name; looked up once, when a request first needs them
    (``getfqdn`` may wait for DNS, which a monitor's start should not)."""
    try:
        return frozenset(_host_name(name) for name in (socket.gethostname(), socket.getfqdn()) if name)
    except OSError:
        return frozenset()


class _MonitorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The page reconnects at once after a restart: reuse the port.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], monitor: Monitor) -> None:
        self.monitor = monitor
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _MonitorHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("monitor %s: " + format, self.address_string(), *args)

    @property
    def monitor(self) -> Monitor:
        return self.server.monitor

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        if path == "/":
            # The page carries the token: only to a request addressed to this machine (not to a rebound DNS name).
            if self._refuse_foreign_host():
                return
            self._send(http.HTTPStatus.OK, self.monitor._page, "text/html; charset=utf-8", _PAGE_HEADERS)
        elif path in _STATIC:
            name, content_type = _STATIC[path]
            self._send(http.HTTPStatus.OK, (resources.files(__package__) / "static" / name).read_bytes(), content_type)
        elif path == "/events":
            self._stream_events()
        elif path.startswith("/frame/") and path.endswith(".jpg"):
            # The page percent-encodes the name (encodeURIComponent): decode it back.
            try:
                camera = urllib.parse.unquote(path[len("/frame/"):-len(".jpg")], errors="strict")
            except UnicodeDecodeError:
                camera = None
            frame = None if camera is None else self.monitor.state.jpeg(camera)
            if frame is None:
                self._send_json(http.HTTPStatus.NOT_FOUND, {"error": f"no frame yet for camera {camera!r}"})
            else:
                self._send(http.HTTPStatus.OK, frame[1], "image/jpeg")
        elif path == "/api/status":
            self._send_json(http.HTTPStatus.OK, {"loop": self.monitor.loop_status(), **self.monitor.state.status(), "refused": self.monitor.refusals()})
        else:
            self._send_json(http.HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_OPTIONS(self) -> None:  # noqa: N802
        # A CORS preflight: another origin asks to send custom headers (the token). Never approved.
        self._refuse("preflight", f"cross-origin request refused: CORS preflight from {self.headers.get('Origin') or 'an unknown origin'} "
                                  "(the monitor answers only its own page)")

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_POST_BODY:
            self.close_connection = True
            self._send_json(http.HTTPStatus.BAD_REQUEST, {"error": f"a button's request has no body (Content-Length {self.headers.get('Content-Length')!r})"})
            return
        if length:
            self.rfile.read(length)
        if self._refuse_foreign_host() or self._refuse_other_origin() or self._refuse_bad_token():
            return
        action = self.path.split("?")[0].removeprefix("/api/")
        if action not in _ACTIONS:
            self._send_json(http.HTTPStatus.NOT_FOUND, {"error": f"unknown action {action!r}; known: {', '.join(_ACTIONS)}"})
            return
        try:
            status = self.monitor.act(action)
        except LookupError as exc:
            self._send_json(http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        except Exception as exc:
            logger.exception("monitor: %s failed", action)
            self._send_json(http.HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{action} failed: {type(exc).__name__}: {exc}"})
        else:
            self._send_json(http.HTTPStatus.OK, {"ok": True, "action": action, "loop": status})

    # -- the checks: each answers 403 and returns True when it refuses ------

    def _refuse_foreign_host(self) -> bool:
        host = self.headers.get("Host")
        if self.monitor._host_allowed(host):
            return False
        self._refuse("host", f"request addressed to host {host!r}, which is not an address of this monitor "
                             "(an IP address, localhost, this machine's name, or a name given with --monitor-allow-host)")
        return True

    def _refuse_other_origin(self) -> bool:
        """Browsers name the page that sent a POST in ``Origin``; it must be the origin the request went to."""
        own = self.headers.get("Host", "").strip().lower()
        origin = self.headers.get("Origin")
        if origin is not None:
            parts = urllib.parse.urlsplit(origin.strip().lower())
            if parts.scheme in ("http", "https") and parts.netloc == own:
                return False
            self._refuse("origin", f"cross-origin request refused: Origin {origin!r} is not this monitor's origin 'http://{own}'")
            return True
        # No Origin (not a browser, or an old one): a browser's other hints must still agree.
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() not in ("same-origin", "none"):
            self._refuse("origin", f"cross-origin request refused: Sec-Fetch-Site is {site!r}, not 'same-origin'")
            return True
        referer = self.headers.get("Referer")
        if referer is not None and urllib.parse.urlsplit(referer.strip().lower()).netloc != own:
            self._refuse("origin", f"cross-origin request refused: Referer {referer!r} is not a page of this monitor ('http://{own}')")
            return True
        return False

    def _refuse_bad_token(self) -> bool:
        given = self.headers.get(TOKEN_HEADER)
        if given is None:
            self._refuse("token", f"missing {TOKEN_HEADER} header: buttons act only for the monitor's own page (a script reads the token from it)")
            return True
        if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), self.monitor.token.encode()):
            self._refuse("token", f"wrong {TOKEN_HEADER}: not this monitor session's token (a page from an earlier session? reload it)")
            return True
        return False

    def _refuse(self, reason: str, message: str) -> None:
        self.monitor._refused(reason, f"{message} [from {self.address_string()}]")
        self._send_json(http.HTTPStatus.FORBIDDEN, {"error": message, "refused": reason})

    # -- answers ----------------------------------------------------------

    def _stream_events(self) -> None:
        self.send_response(http.HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        monitor = self.monitor
        period = 1.0 / float(monitor.config["update_hz"])
        cursor = 0
        try:
            self._event("hello", {**monitor.config, "cameras": monitor.state.cameras()})
            while not monitor._closing.is_set():
                started = time.monotonic()
                cursor, message = monitor.state.update(cursor)
                message["loop"] = monitor.loop_status()
                message["refused"] = monitor.refusals()
                self._event("update", message)
                monitor._closing.wait(max(0.0, period - (time.monotonic() - started)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page went away

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
        self.wfile.flush()

    def _send(self, status: http.HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: http.HTTPStatus, data: dict[str, Any]) -> None:
        self._send(status, (json.dumps(data) + "\n").encode(), "application/json")
