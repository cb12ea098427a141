"""A blocking WebSocket connection for a request/reply client, on websockets' sans-I/O protocol.

``websockets.sync.client`` reads every frame on a background thread and
hands it over through a queue, so each reply costs two thread switches (tens
of microseconds each on a virtual machine) on top of the library's own
buffering. A control loop that sends one observation and waits for its chunk
does not need that: :class:`BlockingConnection` reads in the calling thread,
into one reused buffer, and writes each masked frame with one ``sendmsg``.
The WebSocket protocol itself (handshake, framing, masking, ping/pong, the
closing handshake, size limits) is the ``websockets`` library's sans-I/O
:class:`~websockets.client.ClientProtocol`; this module only moves bytes.

Between requests nobody reads the socket, so a small keep-alive thread wakes
every few seconds while the connection is idle and answers the server's
pings (a server drops a peer that leaves its pings unanswered). It never
runs while a request does.

Exceptions are the ``websockets`` ones a caller of the threaded client
already handles: :class:`~websockets.exceptions.ConnectionClosed`,
:class:`~websockets.exceptions.InvalidStatus` and other
:class:`~websockets.exceptions.InvalidHandshake` errors, plus
``TimeoutError``, ``OSError`` and ``ssl`` errors from the socket.
"""

from __future__ import annotations

import collections
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

__all__ = ["BlockingConnection", "KEEPALIVE_INTERVAL_S"]

#: How often an idle connection reads and answers the server's pings (seconds);
#: servers commonly ping every 20 s and wait 20 s for the answer.
KEEPALIVE_INTERVAL_S = 5.0
#: Bytes read from the socket at a time (one reply of a typical policy fits).
_READ_CHUNK = 256 * 1024


class BlockingConnection:
    """One open WebSocket connection, used from one thread at a time.

    Open it with :meth:`open`; then :meth:`send` a message, :meth:`recv` the
    next one (``bytes`` for a binary message, ``str`` for text) and
    :meth:`close` it.
    """

    def __init__(self, sock: socket.socket, protocol: ClientProtocol, max_size: int | None) -> None:
        self._sock = sock
        self._protocol = protocol
        self._max_size = max_size
        self._buffer = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buffer)
        self._messages: collections.deque[str | bytes] = collections.deque()
        self._fragments: list[bytes] = []
        self._fragment_opcode: Opcode | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        #: The subprotocol the server selected, if any.
        self.subprotocol: Subprotocol | None = None

    # -- opening ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        subprotocols: Sequence[str] = (),
        tls: ssl.SSLContext | None = None,
        max_size: int | None = None,
        keepalive_s: float | None = KEEPALIVE_INTERVAL_S,
    ) -> BlockingConnection:
        """Connect to ``url`` (``ws://`` or ``wss://``) and finish the opening handshake within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        uri = parse_uri(url)
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if uri.secure:
                sock = (tls or ssl.create_default_context()).wrap_socket(sock, server_hostname=uri.host)
            protocol = ClientProtocol(uri, subprotocols=[Subprotocol(name) for name in subprotocols] or None, max_size=max_size)
            request = protocol.connect()
            if headers:
                request.headers.update(headers)
            protocol.send_request(request)
            connection = cls(sock, protocol, max_size)
            connection._flush(deadline)
            connection._finish_handshake(deadline)
        except BaseException:
            sock.close()
            raise
        if keepalive_s:
            threading.Thread(target=connection._keep_alive, args=(keepalive_s,), name="policylink-keepalive", daemon=True).start()
        return connection

    def _finish_handshake(self, deadline: float) -> None:
        while self._protocol.state is State.CONNECTING:
            if not self._read(deadline):
                break
        if self._protocol.handshake_exc is not None:
            raise self._protocol.handshake_exc
        if self._protocol.state is State.CONNECTING:  # (a close right after the handshake is for recv() to report)
            raise InvalidHandshake("the server closed the connection during the opening handshake")

    # -- messages ---------------------------------------------------------

    def send(self, data: bytes, timeout: float | None = None) -> None:
        """Send one binary message (masked, one frame)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._protocol.state is State.CLOSING and self._read(deadline):
                pass  # the server is closing: read to the end to learn its close code
            self._raise_if_closed()
            self._protocol.send_binary(data)
            self._flush(deadline)

    def recv(self, timeout: float | None = None) -> str | bytes:
        """The next message; ``TimeoutError`` when none comes within ``timeout`` s (the connection stays usable)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._messages:
                self._raise_if_closed()
                self._read(deadline)
            return self._messages.popleft()

    def close(self) -> None:
        """Start the closing handshake, then close the socket (without waiting for the server's answer)."""
        self._stopped.set()
        with self._lock:
            try:
                if self._protocol.state is State.OPEN:
                    self._protocol.send_close()
                    self._flush(time.monotonic() + 1.0)
            except (OSError, TimeoutError):
                pass
            finally:
                self._sock.close()

    # -- the socket -------------------------------------------------------

    def _read(self, deadline: float | None) -> bool:
        """Read once from the socket and feed the protocol; ``False`` at the end of the stream."""
        self._sock.settimeout(None if deadline is None else max(1e-4, deadline - time.monotonic()))
        try:
            size = self._sock.recv_into(self._buffer)
        except TimeoutError:
            raise
        except OSError:
            size = 0  # a reset connection ends like a closed one; close_exc says how
        if size:
            self._protocol.receive_data(self._view[:size])
        else:
            self._protocol.receive_eof()
        self._take_events()
        self._flush(deadline)  # pongs, the closing handshake's answer
        return bool(size)

    def _take_events(self) -> None:
        for event in self._protocol.events_received():
            if isinstance(event, Response):
                self.subprotocol = event.headers.get("Sec-WebSocket-Protocol")  # checked by the protocol
            elif isinstance(event, Frame):
                self._take_frame(event)

    def _take_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._fragment_opcode, self._fragments = frame.opcode, [frame.data]
        elif frame.opcode is Opcode.CONT and self._fragment_opcode is not None:
            self._fragments.append(frame.data)
            if self._max_size is not None and sum(map(len, self._fragments)) > self._max_size:
                self._protocol.fail(1009, f"message over {self._max_size} bytes")
                return
        else:
            return  # ping, pong, close: the protocol answers them
        if frame.fin:
            data = b"".join(self._fragments) if len(self._fragments) > 1 else self._fragments[0]
            self._messages.append(data.decode(errors="replace") if self._fragment_opcode is Opcode.TEXT else bytes(data))
            self._fragment_opcode, self._fragments = None, []

    def _flush(self, deadline: float | None) -> None:
        writes = self._protocol.data_to_send()
        chunks = [chunk for chunk in writes if chunk]
        if chunks:
            self._sock.settimeout(None if deadline is None else max(1e-4, deadline - time.monotonic()))
            self._send_chunks(chunks)
        if len(chunks) < len(writes):  # an empty write asks to half-close the connection
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _send_chunks(self, chunks: list[bytes]) -> None:
        if isinstance(self._sock, ssl.SSLSocket):  # no sendmsg on TLS sockets
            for chunk in chunks:
                self._sock.sendall(chunk)
            return
        sent = self._sock.sendmsg(chunks)  # header and payload in one system call, no joined copy
        if sent < sum(map(len, chunks)):
            self._sock.sendall(memoryview(b"".join(chunks))[sent:])

    def _raise_if_closed(self) -> None:
        if self._protocol.state is State.CLOSED:
            raise self._protocol.close_exc

    # -- keep-alive -------------------------------------------------------

    def _keep_alive(self, interval: float) -> None:
        """While idle, read what the server sent (pings, a late reply) every ``interval`` s."""
        while not self._stopped.wait(interval):
            if not self._lock.acquire(blocking=False):
                continue  # a request is running and reads the socket itself
            try:
                if self._protocol.state is not State.OPEN:
                    return
                while self._readable():
                    if not self._read(time.monotonic() + 1.0):
                        return
            except (OSError, TimeoutError, ValueError):
                return  # the next request meets the same condition and reports it
            finally:
                self._lock.release()

    def _readable(self) -> bool:
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        return bool(select.select([self._sock], [], [], 0)[0])

