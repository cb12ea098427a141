"""``policylink status URL``: one look at a running server's health, models, traffic and latency.

It reads the two plain HTTP pages every policylink server answers on its
WebSocket port, ``GET /healthz`` (JSON) and ``GET /metrics`` (Prometheus
text), so it needs nothing beyond the robot-side install: no
``prometheus-client``, no Prometheus server. Latency percentiles are
estimated from the server's histograms the way Prometheus'
``histogram_quantile`` does (linear interpolation inside a bucket), so they
are only as fine as the buckets (1 ms .. 30 s, dense at 10-500 ms).

A ``serve --ray`` front door is recognised by the ``replicas`` field of its
``/healthz``; its ``/metrics`` label every sample with ``replica``, which
gives one row per replica.

Exit status: 0 whenever ``/healthz`` answered (a refused ``/metrics``, a
server that is not ready, are reported in the output); 1 when the server
cannot be reached or does not answer like a policylink server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..server.auth import API_KEY_ENV, resolve_api_key

__all__ = ["add_parser", "run", "collect", "histogram_quantile", "parse_prometheus", "Sample", "http_base_url"]

#: The server's histograms (seconds), shown in this order as latency rows.
HISTOGRAMS = {
    "request": "policylink_request_seconds",
    "inference": "policylink_inference_seconds",
    "queue": "policylink_queue_seconds",
}
#: The percentiles shown.
QUANTILES = (0.5, 0.9, 0.99)
_SCHEMES = {"ws": "http", "http": "http", "wss": "https", "https": "https"}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a running server's health, models, request counts and latency",
        description="Read GET /healthz and GET /metrics of a policylink server (or a serve --ray front door) and print "
                    "its readiness, clients, models, cache counters, requests, errors and latency percentiles.",
    )
    parser.add_argument("url", metavar="URL", help="the server: ws://host:port, wss://host:port, or http(s)://host:port")
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help=f"file holding the server's API key, needed for details and metrics on a locked server (or set ${API_KEY_ENV})")
    parser.add_argument("--ca-file", default=None, metavar="PEM", help="wss:// or https://: the CA certificate that signed the server's (default: the system's roots)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each page (default: 10)")
    parser.add_argument("--json", action="store_true", help="print the collected data as JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    api_key = resolve_api_key(None, args.api_key_file)
    status = collect(args.url, api_key=api_key, ca_file=args.ca_file, timeout=args.timeout)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


# -- fetching -------------------------------------------------------------------------


def http_base_url(url: str) -> str:
    """``http(s)://host:port`` for a server URL: the pages live on the WebSocket port, so ws → http and wss → https.

    A bare ``host:port`` is taken as ``ws://host:port``; gRPC and TCP ports
    serve no HTTP pages, so their URLs are refused with a pointer to the
    WebSocket one.
    """
    if "://" not in url:
        url = f"ws://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"{url!r}: status reads /healthz and /metrics on the WebSocket port; give ws://, wss://, http:// or https://host:port")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host: expected ws://host:port")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number") from None
    return f"{_SCHEMES[parts.scheme]}://{parts.netloc}"


@dataclass
class Page:
    """One HTTP answer: ``status`` 0 means none came (``error`` says why)."""

    status: int
    body: str = ""
    error: str = ""


def fetch(url: str, api_key: str | None, context: ssl.SSLContext | None, timeout: float) -> Page:
    """GET ``url``; an HTTP error status is an answer too, so only a missing answer has ``status`` 0."""
    request = urllib.request.Request(url, headers={"Authorization": f"Api-Key {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return Page(response.status, response.read().decode("utf-8", errors="replace"))
    except urllib.error.HTTPError as exc:
        return Page(exc.code, exc.read().decode("utf-8", errors="replace"), f"HTTP {exc.code} {exc.reason}")
    except urllib.error.URLError as exc:
        return Page(0, error=_reason(exc.reason))
    except (socket.timeout, TimeoutError):
        return Page(0, error=f"no answer within {timeout:g} s")
    except http.client.HTTPException as exc:  # something else listens there: gRPC, TCP, another program
        return Page(0, error=f"the answer is not HTTP ({type(exc).__name__}); is this the server's WebSocket port?")
    except (OSError, ValueError) as exc:  # connection reset mid-answer
        return Page(0, error=_reason(exc))


def _reason(reason: Any) -> str:
    """A short reason for a failed connection: ``connection refused``, ``certificate verify failed: ...``."""
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({reason.verify_message}); pass --ca-file with the CA that signed it"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running on that port?)"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def collect(url: str, api_key: str | None = None, ca_file: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (what ``--json`` prints).

    Raises :class:`ConnectionError` naming ``url`` when ``/healthz`` does not
    answer, and :class:`ValueError` when what answers is not a policylink
    server; a refused or missing ``/metrics`` only sets ``metrics.error``.
    """
    base = http_base_url(url)
    context = ssl.create_default_context(cafile=ca_file) if base.startswith("https:") else None
    health = read_health(url, base, fetch(f"{base}/healthz", api_key, context, timeout))
    front_door = "replicas" in health
    status: dict[str, Any] = {
        "url": url,
        "kind": "front door" if front_door else "server",
        "health": health,
        "details": "clients" in health,  # a locked server shows clients and models to callers with the key only
    }
    page = fetch(f"{base}/metrics", api_key, context, timeout)
    samples, error = read_metrics(page, api_key)
    status["metrics"] = {"error": error, **(summarize(samples) if error is None else {})}
    if front_door:
        status["replicas"] = replica_rows(health, samples if error is None else [])
    return status


def read_health(url: str, base: str, page: Page) -> dict[str, Any]:
    """The ``/healthz`` JSON, or an error that names the URL and what went wrong."""
    if page.status == 0:
        raise ConnectionError(f"cannot reach {url} ({base}/healthz): {page.error}")
    if page.status != 200:
        raise ConnectionError(f"{url}: GET /healthz answered {page.error or page.status}: {page.body.strip()[:200]}")
    try:
        health = json.loads(page.body)
    except json.JSONDecodeError:
        health = None
    if not isinstance(health, dict) or "ready" not in health:
        raise ValueError(f"{url}: /healthz is not a policylink server's (got {page.body.strip()[:80]!r})")
    return health


def read_metrics(page: Page, api_key: str | None) -> tuple[list[Sample], str | None]:
    """The samples of ``/metrics``, or why there are none (a 401 says which key to give)."""
    if page.status == 401:
        if api_key is None:
            return [], f"refused: the server needs an API key (give --api-key-file PATH or set ${API_KEY_ENV})"
        return [], "refused: the API key is wrong"
    if page.status != 200:
        return [], f"not available: {page.error or page.status}"
    samples = parse_prometheus(page.body)
    if not any(sample.name.startswith("policylink_") for sample in samples):
        # A server without prometheus-client answers a line saying what to install.
        first_line = page.body.strip().splitlines()[0] if page.body.strip() else "empty page"
        return [], f"not available: {first_line}"
    return samples, None


# -- Prometheus text ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One line of Prometheus' text format."""

    name: str
    labels: Mapping[str, str]
    value: float


_LINE = re.compile(r'^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$')
_LABEL = re.compile(r'(?P<key>[A-Za-z_]\w*)\s*=\s*"(?P<value>(?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_prometheus(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (comments and unparsable lines skipped).

    A few lines of regex instead of ``prometheus_client.parser``: the robot
    side, where this command is handy, does not install the server extra.
    """
    samples = []
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = {label["key"]: re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m[0]], label["value"]) for label in _LABEL.finditer(match["labels"] or "")}
        samples.append(Sample(match["name"], labels, value))
    return samples


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q``-quantile of a histogram, as Prometheus' ``histogram_quantile`` estimates it.

    ``buckets`` are ``(upper bound, cumulative count)`` pairs, the ``+Inf``
    one included. The quantile's rank is found in the first bucket whose
    count reaches it, and placed linearly between that bucket's lower and
    upper bound (the lowest bucket starts at 0). A rank in the ``+Inf``
    bucket returns the highest finite bound: nothing better is known.
    ``None`` when the histogram is empty or has no ``+Inf`` bucket.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not between 0 and 1")
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]) or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    index = next(i for i, (_, count) in enumerate(ordered) if count >= rank or i == len(ordered) - 1)
    if index == len(ordered) - 1:
        return ordered[-2][0]
    upper, count = ordered[index]
    lower, below = ordered[index - 1] if index > 0 else (0.0, 0.0)
    if index == 0 and upper <= 0:
        return upper
    if count == below:  # q == 0 on an empty leading bucket
        return lower
    return lower + (upper - lower) * (rank - below) / (count - below)


def summarize(samples: list[Sample], where: Callable[[Mapping[str, str]], bool] = lambda labels: True) -> dict[str, Any]:
    """Requests, errors by kind and latency percentiles (ms) of the samples that ``where`` keeps."""
    kept = [sample for sample in samples if where(sample.labels)]
    requests = _sum_by(kept, "policylink_requests_total", "kind")
    errors = _sum_by(kept, "policylink_errors_total", "reason")
    return {
        "requests": sum(requests.values()),
        "requests_by_kind": requests,
        "errors": sum(errors.values()),
        "errors_by_kind": {kind: count for kind, count in errors.items() if count},
        "latency_ms": {row: _percentiles(kept, name) for row, name in HISTOGRAMS.items()},
    }


def _sum_by(samples: list[Sample], name: str, label: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for sample in samples:
        if sample.name == name:
            key = sample.labels.get(label, "")
            totals[key] = totals.get(key, 0) + int(sample.value)
    return dict(sorted(totals.items()))


def _percentiles(samples: list[Sample], histogram: str) -> dict[str, Any]:
    """p50/p90/p99 in ms and the count; buckets of every label set (every replica) added up."""
    buckets: dict[float, float] = {}
    for sample in samples:
        if sample.name == f"{histogram}_bucket" and "le" in sample.labels:
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
    count = int(max(buckets.values(), default=0.0))
    result: dict[str, Any] = {"count": count}
    for q in QUANTILES:
        seconds = histogram_quantile(q, buckets.items())
        result[f"p{q * 100:g}"] = None if seconds is None else round(seconds * 1e3, 3)
    return result


def replica_rows(health: dict[str, Any], samples: list[Sample]) -> list[dict[str, Any]]:
    """One entry per replica of a front door: its health and its share of the metrics."""
    rows = []
    for info in health.get("replica_health") or []:
        replica = str(info.get("replica", ""))
        metrics = summarize(samples, lambda labels, replica=replica: labels.get("replica") == replica) if samples else None
        rows.append({**info, "metrics": metrics})
    return rows


# -- the table ------------------------------------------------------------------------


def format_status(status: dict[str, Any]) -> str:
    """The plain-text report: a key/value block, the latency table, and the replicas of a front door."""
    health, metrics = status["health"], status["metrics"]
    lines = [f"policylink {status['kind']} at {status['url']}"]
    if not health.get("ready"):
        lines.append("  NOT READY: " + ("no replica serves a model yet" if status["kind"] == "front door"
                                       else "no model is served to new clients (idle: a client must send a configure request)"))
    rows = [("status", str(health.get("status", "?"))), ("ready", "yes" if health.get("ready") else "NO")]
    if "replicas" in health:
        rows.append(("replicas", str(health["replicas"])))
    if status["details"]:
        rows.append(("clients", str(health.get("clients", 0))))
        rows += _model_rows(status)
    else:
        rows.append(("details", f"hidden: clients and models need the API key (--api-key-file or ${API_KEY_ENV})"))
    if metrics["error"] is None:
        rows.append(("requests", _counts(metrics["requests"], metrics["requests_by_kind"])))
        rows.append(("errors", _counts(metrics["errors"], metrics["errors_by_kind"])))
    else:
        rows.append(("metrics", metrics["error"]))
    width = max(len(key) for key, _ in rows)
    lines += [f"  {key:<{width}}  {value}" for key, value in rows]
    if metrics["error"] is None:
        lines += ["", "latency (ms, estimated from histogram buckets)"]
        lines += _table(["", "p50", "p90", "p99", "count"],
                        [[row, *(_ms(lat[f"p{q * 100:g}"]) for q in QUANTILES), str(lat["count"])] for row, lat in metrics["latency_ms"].items()])
    if status.get("replicas"):
        lines += ["", "replicas"]
        lines += _table(["replica", "address", "ready", "clients", "models", "requests", "errors", "p50 ms", "p90 ms", "p99 ms"],
                        [_replica_cells(info) for info in status["replicas"]])
    return "\n".join(lines)


def _model_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    health = status["health"]
    if status["kind"] == "front door":
        models = sorted({model for info in health.get("replica_health", []) for model in info.get("models", [])})
        return [("models", ", ".join(models) or "none")]
    cache = (f"{health.get('models_cached', 0)} cached, {health.get('models_loaded', 0)} loaded on request, "
             f"{health.get('model_cache_hits', 0)} hits, {health.get('models_evicted', 0)} evicted")
    return [("models", ", ".join(health.get("models", [])) or "none"), ("model cache", cache)]


def _replica_cells(info: dict[str, Any]) -> list[str]:
    metrics = info.get("metrics")
    request = metrics["latency_ms"]["request"] if metrics else {}
    return [
        str(info.get("replica", "?")), f"{info.get('host', '?')}:{info.get('port', '?')}", "yes" if info.get("ready") else "NO",
        str(info.get("clients", "-")), ", ".join(info.get("models", [])) or "none",
        str(metrics["requests"]) if metrics else "-", str(metrics["errors"]) if metrics else "-",
        *(_ms(request.get(f"p{q * 100:g}")) for q in QUANTILES),
    ]


def _counts(total: int, by_kind: dict[str, int]) -> str:
    parts = ", ".join(f"{kind} {count}" for kind, count in by_kind.items() if count)
    return f"{total} ({parts})" if parts else str(total)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: numeric columns right-aligned so that digits line up."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    numeric = [bool(rows) and all(re.fullmatch(r"-?[\d.]+|-", row[i]) for row in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(cell.rjust(width) if right else cell.ljust(width) for cell, width, right in zip(cells, widths, numeric)).rstrip()

    return [line(header), *(line(row) for row in rows)]
