"""Write one benchmark's table into BENCHMARKS.md, replacing only its own section."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["machine_line", "write_section", "publish", "percentile_ms", "latency_rows", "measure"]

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery section is written by the script named in it; `make bench` reruns them all.\n"


def machine_line() -> str:
    """Which machine, when: enough to compare runs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = ""
    try:
        import torch  # noqa: PLC0415 - optional

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    today = datetime.date.today().isoformat()
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}){gpu}, Python {platform.python_version()}, {today}"


def percentile_ms(samples_s: list[float], q: float) -> float:
    """The q-th percentile of durations given in seconds, in milliseconds."""
    ordered = sorted(samples_s)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index] * 1e3


def latency_rows(rows: list[tuple[str, list[float]]], base_p50_ms: float, digits: int = 1) -> list[str]:
    """Markdown rows ``| name | p50 | p99 | p50 / base |`` for (name, durations in seconds) pairs."""
    lines = []
    for name, samples in rows:
        p50, p99 = percentile_ms(samples, 50), percentile_ms(samples, 99)
        lines.append(f"| {name} | {p50:.2f} | {p99:.2f} | {p50 / base_p50_ms:.{digits}f}x |")
    return lines


def write_section(title: str, body: str, command: str | None = None) -> None:
    """Replace (or append) the ``## title`` section of BENCHMARKS.md."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), BENCHMARKS_MD.parent)
    command = command or ".venv/bin/python " + " ".join([script] + sys.argv[1:])
    section = f"## {title}\n\nMachine: {machine_line()}  \nCommand: `{command}`\n\n{body.strip()}\n"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    BENCHMARKS_MD.write_text(text.rstrip() + "\n")
    print(f"wrote section '{title}' of {BENCHMARKS_MD}")


def publish(title: str, table: str, write: bool = True) -> None:
    """Print a benchmark's table and, unless told not to (``--no-write``), write it as its BENCHMARKS.md section."""
    print(table)
    if write:
        write_section(title, table)


def measure(call: Callable[[], object], requests: int, warmup: int = 20) -> list[float]:
    """Durations in seconds of ``requests`` calls of ``call``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples
