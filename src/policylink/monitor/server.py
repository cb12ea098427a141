"""The monitor's web server: one page, server-sent events, JPEG frames, buttons.

Standard library only (``http.server``), so the robot side needs nothing new:

- ``GET /``                 the page (``static/index.html`` + ``static/monitor.js``)
- ``GET /events``           server-sent events: a ``hello`` event with the
  configuration, then an ``update`` event every ``1 / update_hz`` seconds with
  the new steps, the latest chunk, latencies and the loop's status
- ``GET /frame/<camera>.jpg`` the camera's newest JPEG
- ``GET /api/status``       the loop's status as JSON
- ``POST /api/start``, ``/api/stop``, ``/api/reset`` act on the loop
  through its :class:`~policylink.runtime.events.LoopControl`

:class:`Monitor` bundles the listener, the HTTP server and the frame encoder.
"""

from __future__ import annotations

import http
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ..runtime.events import ChunkEvent, EpisodeEvent, LoopControl, StepEvent
from .state import MonitorState

__all__ = ["Monitor", "DEFAULT_PORT"]

logger = logging.getLogger("policylink.monitor")

DEFAULT_PORT = 9000
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/monitor.js": ("monitor.js", "text/javascript; charset=utf-8")}
_ACTIONS = ("start", "stop", "reset")


class Monitor:
    """A live web page about a control loop; a loop listener.

    >>> monitor = Monitor(control=executor, port=9000).start()   # doctest: +SKIP
    >>> executor.add_listener(monitor)                          # doctest: +SKIP

    ``control`` (optional) is what the start / stop / reset buttons call.
    ``host`` defaults to 127.0.0.1: pass ``0.0.0.0`` to watch from another
    machine (the buttons then act for anyone who can reach the port).
    ``port=0`` picks a free port; :attr:`url` tells which.
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
    ) -> None:
        self.control = control
        self.state = MonitorState(window_s=window_s, jpeg_quality=jpeg_quality)
        self.config = {"title": title, "fps": fps, "window_s": window_s, "update_hz": update_hz, "info": info or {}, "controls": control is not None}
        self.frame_hz = frame_hz
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

    # -- listener: forwarded to the state (control thread) ----------------

    def on_step(self, event: StepEvent) -> None:
        self.state.on_step(event)

    def on_chunk(self, event: ChunkEvent) -> None:
        self.state.on_chunk(event)

    def on_episode(self, event: EpisodeEvent) -> None:
        self.state.on_episode(event)

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
        if path in _STATIC:
            name, content_type = _STATIC[path]
            self._send(http.HTTPStatus.OK, (resources.files(__package__) / "static" / name).read_bytes(), content_type)
        elif path == "/events":
            self._stream_events()
        elif path.startswith("/frame/") and path.endswith(".jpg"):
            frame = self.monitor.state.jpeg(path[len("/frame/"):-len(".jpg")])
            if frame is None:
                self._send_json(http.HTTPStatus.NOT_FOUND, {"error": f"no frame yet for camera {path[7:-4]!r}"})
            else:
                self._send(http.HTTPStatus.OK, frame[1], "image/jpeg")
        elif path == "/api/status":
            self._send_json(http.HTTPStatus.OK, {"loop": self.monitor.loop_status(), **self.monitor.state.status()})
        else:
            self._send_json(http.HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:  # noqa: N802
        action = self.path.split("?")[0].removeprefix("/api/")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
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
                self._event("update", message)
                monitor._closing.wait(max(0.0, period - (time.monotonic() - started)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page went away

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
        self.wfile.flush()

    def _send(self, status: http.HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: http.HTTPStatus, data: dict[str, Any]) -> None:
        self._send(status, (json.dumps(data) + "\n").encode(), "application/json")
