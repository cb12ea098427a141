"""Prometheus metrics of a policy server.

The engine's request path reports every request of every protocol to
``engine.metrics`` (one :class:`ServerMetrics` per
:class:`~policylink.server.engine.Engine`, each with its own registry, so
several servers in one process do not mix their numbers):

- ``policylink_requests_total{protocol, kind}``: answered requests (``infer`` or ``command``)
- ``policylink_errors_total{protocol, reason}``: refused or failed requests,
  by error kind (``bad_request``, ``too_large``, ``busy``, ``unauthorized``,
  ``not_loaded``, ``not_allowed``, ``expired``, ``internal``)
- ``policylink_inference_seconds``, ``policylink_queue_seconds``,
  ``policylink_request_seconds``: histograms of the model call, of the wait
  for a worker or a batch, and of the whole server-side handling
- ``policylink_connected_clients``, ``policylink_models_loaded``,
  ``policylink_model_ready``: gauges read from the engine when scraped

The numbers are served as ``GET /metrics`` on the WebSocket port, and on a
port of their own with ``policylink serve --metrics-port``. Without the
``prometheus-client`` package (part of the ``[server]`` extra) the calls are
no-ops and ``/metrics`` says what to install.
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import ErrorKind

__all__ = ["ServerMetrics", "metrics_available", "loaded_model_ids", "CONTENT_TYPE", "MISSING"]

logger = logging.getLogger("policylink.server")

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError:  # the robot-side install has no server extra
    prometheus_client = None

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MISSING = "metrics need the prometheus-client package: pip install 'policylink[server]'\n"

#: Latency buckets in seconds: 1 ms .. 30 s, dense where policies live (10-500 ms).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


def metrics_available() -> bool:
    return prometheus_client is not None


def loaded_model_ids(engine: Any) -> list[str]:
    """Ids of the models the engine holds: the served one and those loaded on request."""
    return engine.loaded_model_ids()


class ServerMetrics:
    """The counters, histograms and gauges of one engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.registry: Any = None
        if prometheus_client is None:
            return
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("policylink_requests", "Requests answered", ["protocol", "kind"], registry=registry)
        self.errors = Counter("policylink_errors", "Requests refused or failed", ["protocol", "reason"], registry=registry)
        self.inference = Histogram("policylink_inference_seconds", "Time in the model call", buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("policylink_queue_seconds", "Time waiting for a worker or a batch", buckets=LATENCY_BUCKETS, registry=registry)
        self.total = Histogram("policylink_request_seconds", "Server-side time of a request, receipt to reply sent", buckets=LATENCY_BUCKETS, registry=registry)
        Gauge("policylink_connected_clients", "Clients connected now", registry=registry).set_function(lambda: len(engine.sessions))
        Gauge("policylink_models_loaded", "Models loaded now", registry=registry).set_function(lambda: len(loaded_model_ids(engine)))
        Gauge("policylink_model_ready", "1 when the server serves a model to new clients", registry=registry).set_function(lambda: float(engine.ready))

    def request_done(self, protocol: str, reply: Mapping[str, Any], total_s: float) -> None:
        """Count an answered request; ``reply['server_timing']`` feeds the histograms."""
        if self.registry is None:
            return
        timing = reply.get("server_timing") if isinstance(reply, Mapping) else None
        kind = "infer" if isinstance(timing, Mapping) and "infer_ms" in timing else "command"
        self.requests.labels(protocol, kind).inc()
        if kind == "infer":
            assert isinstance(timing, Mapping)
            self.inference.observe(float(timing["infer_ms"]) / 1e3)
            self.queue.observe(float(timing.get("queue_ms", 0.0)) / 1e3)
            self.total.observe(total_s)

    def request_failed(self, protocol: str, kind: ErrorKind) -> None:
        """Count a request answered with an error of ``kind``."""
        if self.registry is None:
            return
        self.errors.labels(protocol, ErrorKind(kind).value).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        if self.registry is None:
            return MISSING.encode()
        return prometheus_client.generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> Any:
        """Serve ``/metrics`` on a port of its own (a daemon thread); returns the HTTP server.

        With an API key on the engine, scrapes must send ``Authorization:
        Bearer KEY`` (or ``Api-Key KEY``), as on every other port.
        """
        if self.registry is None:
            raise ImportError(MISSING.strip())
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] != "/metrics":
                    self._reply(404, b"not found: try /metrics\n", "text/plain")
                elif not metrics.engine.auth.accepts_header(self.headers.get("Authorization")):
                    self._reply(401, b"missing or wrong API key (send 'Authorization: Bearer KEY')\n", "text/plain")
                else:
                    self._reply(200, metrics.render(), CONTENT_TYPE)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
                pass

        server = http.server.ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="policylink-metrics", daemon=True).start()
        return server
