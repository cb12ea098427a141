"""Exceptions raised by policylink, and the error kinds every protocol carries.

Every error a server sends has a *kind* (:class:`ErrorKind`) and a message.
The kind travels in each protocol's own way (a JSON text frame on WebSocket,
an ``error_kind`` field on TCP, a status code plus ``policylink-error-kind``
trailer on gRPC) and decides which exception the client raises; the message
is for people. The same classes are raised on the server to refuse a request
and on the client when the refusal arrives, so ``except ServerBusy`` means
the same thing on both sides.

Client-side errors derive from :class:`PolicyLinkError`, so a robot loop can
catch every failure of the remote policy with one ``except`` clause.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorKind",
    "PolicyLinkError",
    "ServerError",
    "RequestError",
    "RequestTooLarge",
    "ServerBusy",
    "Unauthorized",
    "ModelNotLoaded",
    "NotAllowed",
    "RequestExpired",
    "InferenceTimeout",
    "ProtocolError",
    "ConnectionFailed",
    "CertificateError",
    "error_for_kind",
]


class ErrorKind(str, enum.Enum):
    """Why a server refused or failed a request; one name per way a client should react."""

    #: The request is malformed or does not fit the policy: fix it, do not retry as is.
    BAD_REQUEST = "bad_request"
    #: The message is over the server's size limit: send less.
    TOO_LARGE = "too_large"
    #: The server's queue is full: retry later.
    BUSY = "busy"
    #: Missing or wrong API key.
    UNAUTHORIZED = "unauthorized"
    #: No model is loaded for this client: send a configure request.
    NOT_LOADED = "not_loaded"
    #: The request names something this server does not allow (e.g. a path outside --model-root).
    NOT_ALLOWED = "not_allowed"
    #: The client's deadline passed before the server could answer; the work was dropped.
    EXPIRED = "expired"
    #: The server or the policy failed; the message says how.
    INTERNAL = "internal"


class PolicyLinkError(Exception):
    """Base class of every policylink error."""

    #: The kind a server reports when it refuses a request with this exception.
    kind: ErrorKind = ErrorKind.INTERNAL


class ServerError(PolicyLinkError):
    """The server answered with an error; ``str(exc)`` is the server's message.

    Raised as is for :attr:`ErrorKind.INTERNAL` (a failing policy), and as
    one of its subclasses for the other kinds.
    """


class RequestError(ServerError, ValueError):
    """The request is malformed or does not fit the served policy."""

    kind = ErrorKind.BAD_REQUEST


class RequestTooLarge(RequestError):
    """The message is over the server's size limit."""

    kind = ErrorKind.TOO_LARGE


class ServerBusy(ServerError):
    """The server's queue for this model is full; retry later."""

    kind = ErrorKind.BUSY


class Unauthorized(ServerError):
    """The server wants an API key, and this client sent none or a wrong one."""

    kind = ErrorKind.UNAUTHORIZED


class ModelNotLoaded(ServerError):
    """No model is loaded for this client; send a configure request first."""

    kind = ErrorKind.NOT_LOADED


class NotAllowed(ServerError):
    """The request names something the server does not allow (e.g. a path outside ``--model-root``)."""

    kind = ErrorKind.NOT_ALLOWED


class InferenceTimeout(PolicyLinkError, TimeoutError):
    """No reply arrived within the client's timeout.

    The late reply, if it ever arrives, is discarded: it is never handed to a
    later request.
    """


class RequestExpired(ServerError, InferenceTimeout):
    """The client's deadline passed before the server could answer; the server dropped the work.

    For the caller this is a timeout like any other (``except InferenceTimeout`` catches it).
    """

    kind = ErrorKind.EXPIRED


class ProtocolError(PolicyLinkError):
    """A message could not be encoded or decoded, or broke the protocol."""

    kind = ErrorKind.BAD_REQUEST


class ConnectionFailed(PolicyLinkError, ConnectionError):
    """The server could not be reached in time."""


class CertificateError(ConnectionFailed):
    """The server's TLS certificate was not trusted (wrong CA, wrong host name, expired)."""


_BY_KIND: dict[ErrorKind, type[ServerError]] = {
    ErrorKind.BAD_REQUEST: RequestError,
    ErrorKind.TOO_LARGE: RequestTooLarge,
    ErrorKind.BUSY: ServerBusy,
    ErrorKind.UNAUTHORIZED: Unauthorized,
    ErrorKind.NOT_LOADED: ModelNotLoaded,
    ErrorKind.NOT_ALLOWED: NotAllowed,
    ErrorKind.EXPIRED: RequestExpired,
    ErrorKind.INTERNAL: ServerError,
}


def error_for_kind(kind: str | None, message: str) -> ServerError:
    """The exception a client raises for a server's error of ``kind`` (unknown kinds: :class:`ServerError`)."""
    try:
        cls = _BY_KIND[ErrorKind(kind)]
    except ValueError:
        cls = ServerError
    return cls(message)
