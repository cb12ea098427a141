"""How a fresh action chunk is merged with the actions still queued.

When chunks overlap (asynchronous execution asks for the next chunk before
the current one is used up), two predictions exist for the same control
steps. A :class:`MergeRule` decides what is executed there. The executor
aligns both by control step before calling the rule: ``old[i]`` and
``new[i]`` are predictions for the same step, ``old`` may be shorter than
``new`` (the fresh chunk reaches further), and ``counts[i]`` says how many
predictions ``old[i]`` already averages (1 for a plain action).

Rules:

- :class:`LatestOnly`: the fresh chunk replaces the queue.
- :class:`WeightedAverage`: ``old_weight * old + (1 - old_weight) * new`` on the
  overlap; LeRobot's asynchronous client mixes 0.3 old with 0.7 new.
- :class:`TemporalEnsemble`: ACT's temporal ensembling: every prediction made
  for a step is averaged with weight ``exp(-k * i)``, ``i = 0`` for the
  oldest, so a positive ``k`` favours earlier predictions (smoother), a
  negative one favours the newest (more reactive).
- :class:`RTCSplice`: real-time chunking (Black et al., 2025). The executor
  sends the queued remainder with each request so that a server able to
  (a flow-matching policy) makes the new chunk continue it; the new chunk
  then replaces the queue from the step it arrives at: an exact splice, no
  blend (what merges is latest-only; the executor does the rest).

Write your own by implementing ``merge(old, new, counts)``.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

__all__ = ["MergeRule", "LatestOnly", "WeightedAverage", "TemporalEnsemble", "RTCSplice", "MERGE_RULES", "make_merge_rule"]


class MergeRule(Protocol):
    """Merges queued actions with a fresh chunk aligned to the same first step."""

    name: str

    def merge(self, old: np.ndarray, new: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Return the actions to queue: ``len(new)`` rows, ``new``'s dtype.

        ``old`` is ``(m, action_dim)`` with ``m <= len(new)``; ``counts`` is
        ``(m,)`` int, how many predictions each row of ``old`` combines.
        """
        ...


class LatestOnly:
    """Drop the queued actions; execute the fresh chunk."""

    name = "latest"

    def merge(self, old: np.ndarray, new: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return new.copy()

    def __repr__(self) -> str:
        return "LatestOnly()"


class WeightedAverage:
    """Fixed-weight blend on the overlap: ``old_weight * old + (1 - old_weight) * new``."""

    name = "average"

    def __init__(self, old_weight: float = 0.3) -> None:
        if not 0.0 <= old_weight <= 1.0:
            raise ValueError(f"old_weight must be in [0, 1], got {old_weight}")
        self.old_weight = old_weight

    def merge(self, old: np.ndarray, new: np.ndarray, counts: np.ndarray) -> np.ndarray:
        merged = new.copy()
        overlap = len(old)
        merged[:overlap] = self.old_weight * old + (1.0 - self.old_weight) * new[:overlap]
        return merged

    def __repr__(self) -> str:
        return f"WeightedAverage(old_weight={self.old_weight})"


class TemporalEnsemble:
    """ACT-style temporal ensembling with exponential weights ``exp(-k * i)``.

    A queued row averaging ``c`` predictions carries the weight
    ``sum(exp(-k * i) for i < c)``; the fresh prediction is the ``c``-th and
    gets ``exp(-k * c)``. ``k = 0.01`` is ACT's default.
    """

    name = "ensemble"

    def __init__(self, k: float = 0.01) -> None:
        if not math.isfinite(k):
            raise ValueError(f"k must be finite, got {k}")
        self.k = k

    def merge(self, old: np.ndarray, new: np.ndarray, counts: np.ndarray) -> np.ndarray:
        merged = new.copy()
        overlap = len(old)
        if overlap == 0:
            return merged
        counts = np.asarray(counts, dtype=np.float64)
        ratio = math.exp(-self.k)
        # Sum of exp(-k*i) for i < c, in closed form (c terms of a geometric series).
        old_weight = counts if ratio == 1.0 else (1.0 - ratio**counts) / (1.0 - ratio)
        new_weight = ratio**counts
        total = old_weight + new_weight
        merged[:overlap] = ((old_weight / total)[:, None] * old + (new_weight / total)[:, None] * new[:overlap]).astype(new.dtype)
        return merged

    def __repr__(self) -> str:
        return f"TemporalEnsemble(k={self.k})"


class RTCSplice(LatestOnly):
    """Real-time chunking: the fresh chunk replaces the queue from the step it arrives at, exactly.

    Merging itself is latest-only: the continuity comes from the request.
    With this rule the :class:`~policylink.runtime.executor.Executor` sends
    the actions still queued (and the delay it expects) with every request,
    so that a server whose policy can do real-time chunking computes a chunk
    whose first steps follow them; latency compensation then drops exactly
    the steps executed meanwhile. Against a server that cannot, it is
    :class:`LatestOnly`.
    """

    name = "rtc"

    def __repr__(self) -> str:
        return "RTCSplice()"


MERGE_RULES = {"latest": LatestOnly, "average": WeightedAverage, "ensemble": TemporalEnsemble, "rtc": RTCSplice}


def make_merge_rule(name: str, **options: float) -> MergeRule:
    """Build a rule by name: ``latest``, ``average`` (``old_weight``), ``ensemble`` (``k``) or ``rtc``."""
    try:
        cls = MERGE_RULES[name]
    except KeyError:
        raise ValueError(f"unknown merge rule {name!r}; choose one of {sorted(MERGE_RULES)}") from None
    return cls(**options)  # type: ignore[arg-type]
