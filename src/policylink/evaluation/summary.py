"""Turn episode results into the numbers people report, and a table to print."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .rollout import EpisodeResult

__all__ = ["wilson_interval", "summarize", "format_summary"]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a success rate (95 % by default).

    Unlike the normal approximation it stays inside [0, 1] and is honest for
    small samples and rates near 0 or 1, which is what evaluations have.
    """
    if trials <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1 (not 1e-17 off).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return (low, high)


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "std": 0.0}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def summarize(results: Sequence[EpisodeResult], wall_s: float) -> dict[str, Any]:
    """Success rate with its 95 % Wilson interval, return, length, latencies, throughput."""
    n = len(results)
    successes = sum(result.success for result in results)
    low, high = wilson_interval(successes, n)
    steps = sum(result.length for result in results)
    return {
        "episodes": n,
        "successes": successes,
        "success_rate": successes / n if n else 0.0,
        "success_ci95": [low, high],
        "return": _stats([result.total_reward for result in results]),
        "max_reward": _stats([result.max_reward for result in results]),
        "length": _stats([result.length for result in results]),
        "requests": sum(result.requests for result in results),
        "roundtrip_ms": _percentiles([v for result in results for v in result.roundtrip_ms]),
        "infer_ms": _percentiles([v for result in results for v in result.infer_ms]),
        "wall_s": round(wall_s, 3),
        "episodes_per_minute": 60.0 * n / wall_s if wall_s > 0 else 0.0,
        "steps_per_second": steps / wall_s if wall_s > 0 else 0.0,
    }


def format_summary(summary: dict[str, Any], title: str = "evaluation") -> str:
    """A plain-text table of :func:`summarize`'s numbers."""
    low, high = summary["success_ci95"]

    def ms(stat: dict[str, float | None]) -> str:
        if stat["p50"] is None:
            return "n/a"
        return f"{stat['p50']:.1f} / {stat['p99']:.1f} ms"

    rows = [
        ("episodes", str(summary["episodes"])),
        ("success rate", f"{summary['success_rate']:.1%}  ({summary['successes']}/{summary['episodes']}, 95% CI {low:.1%} - {high:.1%})"),
        ("return", f"{summary['return']['mean']:.3f} ± {summary['return']['std']:.3f}"),
        ("max reward", f"{summary['max_reward']['mean']:.3f} ± {summary['max_reward']['std']:.3f}"),
        ("episode length", f"{summary['length']['mean']:.1f} ± {summary['length']['std']:.1f} steps"),
        ("round trip p50 / p99", ms(summary["roundtrip_ms"])),
        ("server infer p50 / p99", ms(summary["infer_ms"])),
        ("chunks requested", str(summary["requests"])),
        ("throughput", f"{summary['episodes_per_minute']:.1f} episodes/min, {summary['steps_per_second']:.0f} steps/s"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join(lines)
