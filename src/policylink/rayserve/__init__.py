"""Serve one policy from many replicas (GPUs, machines) on Ray Serve, behind the usual protocols.

``policylink serve --ray`` deploys N replicas of policylink's own server on
Ray Serve (:mod:`.replica`), which places them, restarts them and scales
their number, and opens one front door (:mod:`.frontdoor`) that relays each
client connection to a replica chosen by Serve. Clients do not change. The
Ray start-up and deployment are in :mod:`.cluster`; the CLI in :func:`run`.
Needs the ``[ray]`` extra. See docs/scale-out.md.
"""

from __future__ import annotations

from .run import run

__all__ = ["run"]
