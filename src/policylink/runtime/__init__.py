"""The client runtime: a fixed-rate control loop executing action chunks.

See :mod:`policylink.runtime.executor` for the loop, :mod:`.merging` for how
overlapping chunks combine, :mod:`.filters` for the safety filters and chunk
validation, :mod:`.clock` for real and simulated time, :mod:`.stats` for what
the loop measures and :mod:`.events` for what it tells its listeners.
"""

from .clock import RealTimeClock, SteppedClock
from .executor import Executor, ExecutorConfig
from .stats import LoopStats

__all__ = ["Executor", "ExecutorConfig", "RealTimeClock", "SteppedClock", "LoopStats"]
