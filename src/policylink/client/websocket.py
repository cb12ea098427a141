"""The WebSocket transport of :class:`~policylink.client.PolicyClient`.

Synchronous on purpose: a robot control loop calls ``infer`` and waits, and
the background machinery (pings, reading frames) lives in the websockets
library's own thread.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import websockets
from websockets.sync.client import ClientConnection, connect

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import ConnectionFailed, InferenceTimeout, ProtocolError, ServerBusy, ServerError

__all__ = ["WebSocketTransport"]

logger = logging.getLogger("policylink.client")

_MESSAGE_TOO_BIG = 1009
# websockets >= 17 wants connect() in a ``with`` block unless ``legacy=True``;
# older releases have no such flag. The connection outlives any one block here.
_CONNECT_OPTIONS = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


class WebSocketTransport:
    """One request/reply conversation with a policylink or openpi server.

    Replies come back in request order. When a request times out its reply
    is still owed; the transport counts such owed replies and throws them
    away when they arrive, so a late chunk is never returned for a newer
    request.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        connect_timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self._ws: ClientConnection | None = None
        self._packer = Packer()
        self._owed_replies = 0
        self.metadata_frame: dict[str, Any] = {}

    # -- connection -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def connect(self) -> dict[str, Any]:
        """Connect (waiting for a server that is not up yet); returns the metadata frame."""
        deadline = time.monotonic() + self.connect_timeout
        delay, attempt = 0.1, 0
        while True:
            attempt += 1
            try:
                return self._connect_once(max(0.1, deadline - time.monotonic()))
            except websockets.InvalidStatus as exc:
                raise ConnectionFailed(f"server at {self.url} refused the connection: HTTP {exc.response.status_code} {exc.response.body.decode(errors='replace').strip()}") from None
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectionFailed(f"no policy server at {self.url} after {self.connect_timeout:.0f} s ({attempt} attempts): {exc}") from None
                if attempt == 1 or attempt % 10 == 0:
                    logger.info("waiting for policy server at %s (attempt %d, %s)", self.url, attempt, exc)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 2.0)

    def _connect_once(self, timeout: float) -> dict[str, Any]:
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        ws = connect(
            self.url,
            additional_headers=headers,
            compression=None,
            max_size=self.max_message_bytes,
            open_timeout=timeout,
            ping_interval=20,
            ping_timeout=60,
            **_CONNECT_OPTIONS,
        )
        try:
            frame = ws.recv(timeout=timeout)
        except BaseException:
            ws.close()
            raise
        if isinstance(frame, str):
            ws.close()
            raise ProtocolError(f"expected a metadata frame from {self.url}, got text: {frame[:200]}")
        self._ws, self._owed_replies = ws, 0
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

        Raises :class:`InferenceTimeout`, :class:`ServerError` (the server's
        error text), :class:`ProtocolError`, or ``websockets.ConnectionClosed``
        when the connection dropped (the caller decides whether to reconnect).
        """
        if self._ws is None:
            self.connect()
        assert self._ws is not None
        payload = self._packer.pack(message)
        if len(payload) > self.max_message_bytes:
            raise ProtocolError(f"message is {len(payload)} bytes, over the {self.max_message_bytes}-byte limit")
        deadline = time.monotonic() + timeout
        try:
            self._ws.send(payload)
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
                raise ProtocolError(f"server refused the message as too big ({len(payload)} bytes): {exc.rcvd.reason}") from None
            raise

    def _receive(self, deadline: float, timeout: float) -> str | bytes:
        assert self._ws is not None
        try:
            return self._ws.recv(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            # The reply is still owed: count it so that it is dropped when it comes.
            self._owed_replies += 1
            raise InferenceTimeout(f"no reply from {self.url} within {timeout:.3g} s") from None

    @staticmethod
    def _decode(frame: str | bytes) -> Any:
        if isinstance(frame, str):
            if frame.startswith("server busy"):
                raise ServerBusy(frame)
            raise ServerError(frame)
        return unpackb(frame)
