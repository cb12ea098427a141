"""What every client transport offers :class:`~policylink.client.PolicyClient`.

A transport (WebSocket, gRPC) moves one request and its reply. It raises
only typed errors: :class:`~policylink.errors.InferenceTimeout`, the
:class:`~policylink.errors.ServerError` subclass that the server's error
*kind* names, :class:`~policylink.errors.ProtocolError`,
:class:`~policylink.errors.ConnectionFailed` (including
:class:`~policylink.errors.CertificateError`) when connecting fails, and
:class:`ConnectionLost` when an open connection drops, after which the
client reconnects. Message text never decides an exception's class.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, Protocol

from ..errors import CertificateError, ConnectionFailed, ProtocolError, RequestTooLarge

__all__ = ["Transport", "ConnectionLost", "client_tls_context", "probe_tls", "check_request_size"]


class ConnectionLost(ConnectionFailed):
    """An open connection dropped (server restart, network blip, expired session); reconnecting may help."""


class Transport(Protocol):
    url: str
    #: The metadata frame of the current connection.
    metadata_frame: dict[str, Any]

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout: float) -> dict[str, Any]:
        """Connect, waiting up to ``timeout`` s for a server that is not up yet; returns the metadata frame."""

    def request(self, message: dict[str, Any], timeout: float) -> Any:
        """Send an observation or command map; return the reply map."""

    def close(self) -> None: ...


def check_request_size(size: int, own_limit: int, metadata_frame: dict[str, Any]) -> None:
    """Refuse a request before sending it: over the client's own limit, or over the one the server announced."""
    if size > own_limit:
        raise ProtocolError(f"message is {size} bytes, over the {own_limit}-byte limit")
    server_limit = metadata_frame.get("max_message_bytes")
    if isinstance(server_limit, int) and 0 < server_limit < size:
        raise RequestTooLarge(f"message is {size} bytes; the server accepts at most {server_limit}")


def client_tls_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """A TLS context that trusts ``ca_file`` (PEM), or the system's roots without one."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def probe_tls(host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
    """One TLS handshake with ``host:port``: :class:`CertificateError` if the certificate is not trusted.

    Connection errors (the server is not up yet) propagate as ``OSError``;
    other TLS failures (the port does not speak TLS) as :class:`ConnectionFailed`.
    """
    with socket.create_connection((host, port), timeout=timeout) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(f"TLS certificate of {host}:{port} not trusted: {exc.verify_message or exc.reason}; pass ca_file= with the CA that signed it") from None
        except ssl.SSLError as exc:
            raise ConnectionFailed(f"TLS handshake with {host}:{port} failed: {exc.reason or exc} (does the port speak TLS?)") from None
