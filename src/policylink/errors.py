"""Exceptions raised by policylink.

Client-side errors derive from :class:`PolicyLinkError` so that a robot loop
can catch every failure of the remote policy with one ``except`` clause.
"""

from __future__ import annotations

__all__ = [
    "PolicyLinkError",
    "ServerError",
    "InferenceTimeout",
    "ProtocolError",
    "ConnectionFailed",
    "ServerBusy",
    "RequestError",
]


class PolicyLinkError(Exception):
    """Base class of every policylink error."""


class ServerError(PolicyLinkError):
    """The server answered with an error; ``str(exc)`` is the server's message."""


class ServerBusy(ServerError):
    """The server's queue for this model is full; retry later."""


class InferenceTimeout(PolicyLinkError, TimeoutError):
    """No reply arrived within the client's timeout.

    The late reply, if it ever arrives, is discarded: it is never handed to a
    later request.
    """


class ProtocolError(PolicyLinkError):
    """A message could not be encoded or decoded, or broke the protocol."""


class ConnectionFailed(PolicyLinkError, ConnectionError):
    """The server could not be reached within the connect timeout."""


class RequestError(PolicyLinkError, ValueError):
    """Server side: a request is malformed; the message is sent to that client."""
