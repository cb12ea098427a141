"""Evaluating served policies in simulation (``policylink eval``)."""

from .rollout import MODES, EpisodeResult, ExecutionConfig, run_episode
from .runner import EvalConfig, EvalReport, evaluate, write_results
from .summary import format_summary, summarize, wilson_interval

__all__ = [
    "MODES",
    "EpisodeResult",
    "ExecutionConfig",
    "run_episode",
    "EvalConfig",
    "EvalReport",
    "evaluate",
    "write_results",
    "format_summary",
    "summarize",
    "wilson_interval",
]
