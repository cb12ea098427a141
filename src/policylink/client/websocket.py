"""The WebSocket transport of :class:`~policylink.client.PolicyClient`.

Synchronous on purpose: a robot control loop calls ``infer`` and waits. The
connection (:class:`~policylink.client.connection.BlockingConnection`) reads
each reply in the calling thread; the WebSocket protocol itself is the
``websockets`` library's.

The transport offers the ``policylink.v1`` subprotocol. A policylink server
accepts it and then sends errors as JSON with their kind, and honours the
``__timeout_ms__`` the transport adds to each observation (it drops a
request whose client has given up). An openpi server ignores the offer; the
transport then speaks plain openpi: errors are text, no extra keys are sent.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import websockets

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import (
    CertificateError,
    ConnectionFailed,
    InferenceTimeout,
    ProtocolError,
    RequestTooLarge,
    ServerBusy,
    ServerError,
    Unauthorized,
    error_for_kind,
)
from .connection import BlockingConnection
from .transport import ConnectionLost, check_request_size, client_tls_context

__all__ = ["WebSocketTransport", "SUBPROTOCOL"]

logger = logging.getLogger("policylink.client")

#: Offered on connect; a policylink server selects it.
SUBPROTOCOL = "policylink.v1"
_COMMAND_KEY = "__command__"
_TIMEOUT_KEY = "__timeout_ms__"
_MESSAGE_TOO_BIG = 1009
_TRY_AGAIN_LATER = 1013


class WebSocketTransport:
    """One request/reply conversation with a policylink or openpi server.

    Replies come back in request order. When a request times out its reply
    is still owed; the transport counts such owed replies and throws them
    away when they arrive, so a late chunk is never returned for a newer
    request. ``wss://`` URLs verify the server against ``ca_file`` (PEM) or
    the system's roots.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        connect_timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        ca_file: str | Path | None = None,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self.tls = client_tls_context(ca_file) if urlparse(url).scheme == "wss" else None
        self._ws: BlockingConnection | None = None
        self._packer = Packer()
        self._owed_replies = 0
        self._policylink = False
        self.metadata_frame: dict[str, Any] = {}

    # -- connection -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Connect, waiting up to ``timeout`` s (default ``connect_timeout``) for the server; returns the metadata frame."""
        timeout = self.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay, attempt = 0.05, 0
        while True:
            attempt += 1
            try:
                return self._connect_once(max(0.05, deadline - time.monotonic()))
            except websockets.InvalidStatus as exc:
                status, body = exc.response.status_code, exc.response.body.decode(errors="replace").strip()
                if status == 401:
                    raise Unauthorized(f"server at {self.url} refused the connection: HTTP 401 {body}") from None
                raise ConnectionFailed(f"server at {self.url} refused the connection: HTTP {status} {body}") from None
            except ssl.SSLCertVerificationError as exc:
                raise self._certificate_error(exc) from None
            except ssl.SSLError as exc:
                raise ConnectionFailed(f"TLS handshake with {self.url} failed: {exc.reason or exc} (does the server speak TLS?)") from None
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectionFailed(f"no policy server at {self.url} after {timeout:.3g} s ({attempt} attempts): {exc}") from None
                if attempt == 1 or attempt % 10 == 0:
                    logger.info("waiting for policy server at %s (attempt %d, %s)", self.url, attempt, exc)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)

    def _certificate_error(self, exc: ssl.SSLCertVerificationError) -> CertificateError:
        return CertificateError(f"TLS certificate of {self.url} not trusted: {exc.verify_message or exc.reason}; pass ca_file= with the CA that signed it")

    def _connect_once(self, timeout: float) -> dict[str, Any]:
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        ws = BlockingConnection.open(
            self.url, timeout=timeout, headers=headers, subprotocols=[SUBPROTOCOL], tls=self.tls, max_size=self.max_message_bytes
        )
        try:
            frame = ws.recv(timeout=timeout)
        except websockets.ConnectionClosed as exc:
            ws.close()
            if exc.rcvd is not None and exc.rcvd.code == _TRY_AGAIN_LATER:
                raise ServerBusy(exc.rcvd.reason or f"server at {self.url} is at its connection limit") from None
            raise
        except BaseException:
            ws.close()
            raise
        if isinstance(frame, str):
            ws.close()
            raise ProtocolError(f"expected a metadata frame from {self.url}, got text: {frame[:200]}")
        self._ws, self._owed_replies = ws, 0
        self._policylink = ws.subprotocol == SUBPROTOCOL
        self.metadata_frame = unpackb(frame)
        logger.info("connected to policy server at %s", self.url)
        return self.metadata_frame

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    # -- requests ---------------------------------------------------------

    def request(self, message: dict[str, Any], timeout: float) -> Any:
        """Send ``message`` and return the decoded reply to it.

        Raises :class:`InferenceTimeout`, the :class:`ServerError` subclass
        of the server's error kind, :class:`ProtocolError`, or
        :class:`ConnectionLost` when the connection dropped.
        """
        if self._ws is None:
            self.connect()
        assert self._ws is not None
        if self._policylink and _COMMAND_KEY not in message:
            message = {**message, _TIMEOUT_KEY: round(timeout * 1e3, 3)}
        payload = self._packer.pack(message)
        check_request_size(len(payload), self.max_message_bytes, self.metadata_frame)
        deadline = time.monotonic() + timeout
        try:
            self._ws.send(payload, timeout)
            while True:
                frame = self._receive(deadline, timeout)
                if self._owed_replies:
                    self._owed_replies -= 1  # a late reply to a request that timed out
                    logger.debug("discarded a late reply from %s", self.url)
                    continue
                return self._decode(frame)
        except websockets.ConnectionClosed as exc:
            self._ws = None
            if exc.rcvd is not None and exc.rcvd.code == _MESSAGE_TOO_BIG:
                raise RequestTooLarge(f"server refused the message as too big ({len(payload)} bytes): {exc.rcvd.reason}") from None
            raise ConnectionLost(f"connection to {self.url} closed: {exc}") from None
        except OSError as exc:
            self._ws = None
            raise ConnectionLost(f"connection to {self.url} lost: {exc}") from None

    def _receive(self, deadline: float, timeout: float) -> str | bytes:
        assert self._ws is not None
        try:
            return self._ws.recv(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            # The reply is still owed: count it so that it is dropped when it comes.
            self._owed_replies += 1
            raise InferenceTimeout(f"no reply from {self.url} within {timeout:.3g} s") from None

    def _decode(self, frame: str | bytes) -> Any:
        if isinstance(frame, bytes):
            return unpackb(frame)
        if self._policylink:
            try:
                error = json.loads(frame)
                kind, message = error.get("kind"), str(error["message"])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ServerError(frame) from None  # not the structured form after all: the text is the message
            raise error_for_kind(kind, message)
        raise ServerError(frame)
