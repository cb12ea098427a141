"""Real-time chunking over the network: request fields, server guidance, client splicing.

- :mod:`.request` (numpy only): the fields a request carries and what a
  server announces (:class:`RTCRequest`, :class:`RTCSupport`).
- :mod:`.guidance` (server: torch, lerobot): LeRobot's RTC guidance for a
  batch of clients with their own remainders and delays.

The client side is the executor's ``merge="rtc"`` (:mod:`policylink.runtime.executor`).
"""

from .request import RTC_KEY, SCHEDULES, SEED_KEY, RTCRequest, RTCSupport, parse_seed

__all__ = ["RTC_KEY", "SEED_KEY", "SCHEDULES", "RTCRequest", "RTCSupport", "parse_seed"]
