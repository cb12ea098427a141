"""The API key that locks every port of a server.

One key, checked the same way everywhere: WebSocket (HTTP header
``Authorization: Api-Key KEY`` or ``Bearer KEY``), gRPC and LeRobot-compat
(call metadata ``authorization: Bearer KEY``), length-prefixed TCP (a first
``{"__command__": "auth", "api_key": KEY}`` frame), and ``/healthz`` /
``/metrics`` details. Comparison is constant-time (:func:`hmac.compare_digest`)
so the time a refusal takes says nothing about how much of a guess was right.

The key can come from a file (``--api-key-file``) or the environment
(``POLICYLINK_API_KEY``) as well as the command line; a key on the command
line is visible to every local user in the process list.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

__all__ = ["ApiKey", "resolve_api_key", "API_KEY_ENV"]

#: Environment variable read when neither ``--api-key`` nor ``--api-key-file`` is given.
API_KEY_ENV = "POLICYLINK_API_KEY"

_SCHEMES = ("api-key", "bearer")


class ApiKey:
    """The server's key (``None``: no key required) and the one way to check a presented key."""

    def __init__(self, key: str | None = None) -> None:
        if key is not None and not key.strip():
            raise ValueError("the API key is empty")
        self._key = key.strip().encode() if key is not None else None

    @property
    def required(self) -> bool:
        return self._key is not None

    def accepts(self, presented: str | bytes | None) -> bool:
        """Whether ``presented`` is the key (always true when none is required); constant-time."""
        if self._key is None:
            return True
        if presented is None:
            return False
        if isinstance(presented, str):
            presented = presented.encode(errors="replace")
        return hmac.compare_digest(presented.strip(), self._key)

    def accepts_header(self, value: str | None) -> bool:
        """Whether an ``Authorization`` header value (``Api-Key KEY`` or ``Bearer KEY``) carries the key."""
        if self._key is None:
            return True
        scheme, _, token = (value or "").strip().partition(" ")
        return scheme.lower() in _SCHEMES and self.accepts(token)


def resolve_api_key(value: str | None = None, file: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> str | None:
    """The key from ``--api-key``, else ``--api-key-file``, else ``$POLICYLINK_API_KEY``; ``None`` when none is set.

    Raises ``ValueError`` naming the problem for both flags at once, an
    unreadable file or an empty key.
    """
    if value is not None and file is not None:
        raise ValueError("give the API key with --api-key or --api-key-file, not both")
    if file is not None:
        try:
            value = Path(file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {str(file)!r}: {exc.strerror or exc}") from None
        if not value:
            raise ValueError(f"--api-key-file {str(file)!r} is empty")
        return value
    if value is None:
        value = (os.environ if env is None else env).get(API_KEY_ENV) or None
    if value is not None and not value.strip():
        raise ValueError("the API key is empty")
    return value.strip() if value is not None else None
