"""Length-prefixed TCP for legacy clients.

Every frame, both ways, is a 4-byte big-endian unsigned length followed by
that many payload bytes. The conversation is the WebSocket protocol's:

1. the server sends the metadata map as the first frame — or, when it has
   an API key, ``{"status": "auth_required", ...}``; the client then sends
   ``{"__command__": "auth", "api_key": KEY}`` and gets the metadata map
   (a wrong or missing key gets an error frame and the connection closes);
2. each client frame is an observation map (or a ``{"__command__": ...}``
   map); the server answers with the reply map (``actions``,
   ``server_timing``);
3. a refused request is answered with ``{"error": "<what is wrong>",
   "kind": "<error kind>"}`` and the connection stays open.

Payloads are msgpack (policylink / openpi encoding of numpy arrays). With
``trust_pickle`` a client may instead send a pickled observation object
(a pickle starts with ``0x80`` and a protocol byte, which no useful msgpack
map does): it is unpickled with :mod:`.safe_pickle`, its fields are mapped
(see :func:`legacy_observation`), and the reply is a pickled list of
per-step action arrays (``{"error": ...}`` on failure).

Bounds: a frame longer than ``max_frame_bytes``, a connection that ends
inside a length prefix or a payload, one silent for ``read_timeout_s``
inside a frame or ``idle_timeout_s`` between frames, is answered with an
error frame (where the socket is still writable) and closed. A connection
over the server's limit gets a ``busy`` error frame and is closed. A client
that closes its side while its request is worked on is gone: the request
is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import ErrorKind, ProtocolError, RequestError, RequestTooLarge, Unauthorized
from . import safe_pickle
from .app import ServesInBlock
from .engine import COMMAND_KEY, PROTOCOL_VERSION, ClientSession, Engine, Failure, Request

__all__ = ["TcpServer", "legacy_observation", "HEADER", "AUTH_COMMAND"]

logger = logging.getLogger("policylink.server")

#: The length prefix: 4-byte big-endian unsigned.
HEADER = struct.Struct(">I")
#: The command a client sends first to a server with an API key.
AUTH_COMMAND = "auth"
#: Largest piece read from the socket at once.
_CHUNK = 1 << 20


class FrameError(ProtocolError):
    """The byte stream broke the framing; the connection cannot continue."""


class _FrameTooLarge(FrameError, RequestTooLarge):
    kind = ErrorKind.TOO_LARGE


def legacy_observation(obj: Any, camera_names: Sequence[str]) -> dict[str, Any]:
    """Map a legacy pickled observation onto policylink's keys.

    ``state`` -> ``observation.state``; ``image`` ``(K, C, H, W)`` -> one
    ``observation.images.<camera>`` ``(H, W, C)`` per camera, named after the
    policy's cameras in order (``cam0``, ``cam1``, ... when it names none);
    ``raw_lang`` -> ``task``. A dict with these keys is accepted too.
    """
    fields = obj if isinstance(obj, dict) else vars(obj) if hasattr(obj, "__dict__") else None
    if fields is None:
        raise RequestError(f"a pickled observation must be an object or dict with 'state', 'image', 'raw_lang', got {type(obj).__name__}")
    obs: dict[str, Any] = {}
    if fields.get("state") is not None:
        obs["observation.state"] = np.asarray(_numpy(fields["state"]), np.float32).reshape(-1)
    if fields.get("image") is not None:
        images = np.asarray(_numpy(fields["image"]))
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise RequestError(f"'image' must be (K, C, H, W), got shape {images.shape}")
        for k, image in enumerate(images):
            name = camera_names[k] if k < len(camera_names) else f"cam{k}"
            obs[f"observation.images.{name}"] = np.ascontiguousarray(np.moveaxis(image, 0, -1))
    if fields.get("raw_lang"):
        obs["task"] = str(fields["raw_lang"])
    if not obs:
        raise RequestError("the pickled observation has none of 'state', 'image', 'raw_lang'")
    return obs


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def _looks_pickled(payload: bytes | bytearray) -> bool:
    return len(payload) > 1 and payload[0] == 0x80 and payload[1] <= pickle.HIGHEST_PROTOCOL


class TcpServer(ServesInBlock):
    """Serves an :class:`Engine` over length-prefixed TCP.

    ``trust_pickle`` admits pickled payloads (restricted unpickler);
    ``pickle_records`` names legacy classes (``"module:Class"``) rebuilt as
    attribute bags.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "0.0.0.0",
        port: int = 9000,
        *,
        max_frame_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        trust_pickle: bool = False,
        pickle_records: Iterable[str] = (),
        read_timeout_s: float = 10.0,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.trust_pickle = trust_pickle
        self.pickle_records = tuple(pickle_records)
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.trust_pickle:
            safe_pickle.prepare()  # imports torch & co. now, never inside a request
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=_CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("TCP server listening on tcp://%s:%d%s", self.host, self.port, " (pickle admitted)" if self.trust_pickle else "")

    async def stop_accepting(self) -> None:
        """Stop listening; open connections stay (a draining server finishes their requests)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # -- one connection ---------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packer = Packer()
        if not self.engine.connections.try_open():
            logger.warning("refused a TCP connection: %s", self.engine.connections.refusal())
            await self._send_and_close(writer, packer.pack({"error": self.engine.connections.refusal(), "kind": ErrorKind.BUSY.value}))
            return
        peer = writer.get_extra_info("peername")
        try:
            await self.engine.wait_ready()  # during warm-up the client waits for its metadata frame
        except BaseException:
            self.engine.connections.close()
            raise
        session = self.engine.open_session("%s:%s" % peer[:2] if peer else "", "tcp", self.max_frame_bytes)
        frames: asyncio.Queue[bytearray | BaseException | None] = asyncio.Queue(maxsize=1)
        reading = asyncio.ensure_future(self._read_frames(reader, frames))
        try:
            authorized = not self.engine.auth.required
            first = self.engine.metadata_frame(session) if authorized else {
                "status": "auth_required", "protocol": PROTOCOL_VERSION,
                "message": f"this server needs an API key: send {{'{COMMAND_KEY}': '{AUTH_COMMAND}', 'api_key': KEY}} first",
            }
            await self._send(writer, packer.pack(first))
            while True:
                item = await frames.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    failure = self.engine.refuse(session, item)
                    await self._send(writer, packer.pack(_error_map(failure)))
                    break
                if not authorized:
                    authorized = await self._authorize(session, item, writer, packer)
                    if not authorized:
                        break
                    continue
                self.engine.begin()  # until the reply is sent: a draining server waits for it
                try:
                    body = await self._answer(session, item, reading, packer)
                    if body is None:  # the client went away while its request was worked on: dropped
                        break
                    await self._send(writer, body)
                finally:
                    self.engine.end()
        except (ConnectionError, OSError) as exc:
            logger.info("%s: connection lost: %s", session.client_id, exc)
        finally:
            reading.cancel()
            self.engine.close_session(session)
            self.engine.connections.close()
            writer.close()  # flushes what is buffered (an error frame), then closes

    async def _authorize(self, session: ClientSession, payload: bytearray, writer: asyncio.StreamWriter, packer: Packer) -> bool:
        """Check a first frame ``{"__command__": "auth", "api_key": KEY}``; answer with the metadata or a refusal."""
        request = None if _looks_pickled(payload) else await self.engine.decode(_decode_msgpack, payload)
        if request is not None and request.command == AUTH_COMMAND and self.engine.auth.accepts(_text(request.fields.get("api_key"))):
            await self._send(writer, packer.pack(self.engine.metadata_frame(session)))
            return True
        failure = self.engine.refuse(session, Unauthorized(f"missing or wrong API key: send {{'{COMMAND_KEY}': '{AUTH_COMMAND}', 'api_key': KEY}} as the first frame"))
        await self._send(writer, packer.pack(_error_map(failure)))
        return False

    async def _answer(self, session: ClientSession, payload: bytearray, reading: asyncio.Future, packer: Packer) -> bytes | None:
        """The encoded reply (or error) to one frame; ``None`` when the client left first."""
        pickled = _looks_pickled(payload)
        if pickled and self.trust_pickle:
            decode, encode = self._pickle_decoder(session), _encode_pickle
        elif pickled:
            decode, encode = _refuse_pickle, packer.pack
        else:
            decode, encode = _decode_msgpack, packer.pack
        quick = None if pickled else Request.quick_from_msgpack
        work = asyncio.ensure_future(self.engine.handle(session, payload, decode, encode, quick_decode=quick))
        await asyncio.wait({work, reading}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the reader hit the end of the stream: nobody will read the reply
            work.cancel()
            return None
        outcome = work.result()
        if outcome.failure is None:
            return outcome.body
        if pickled and self.trust_pickle:
            return pickle.dumps({"error": outcome.failure.message, "kind": outcome.failure.kind.value}, protocol=4)
        return packer.pack(_error_map(outcome.failure))

    def _pickle_decoder(self, session: ClientSession) -> Any:
        cameras = session.model.metadata.camera_names if session.model else ()
        records = self.pickle_records
        max_bytes = self.max_frame_bytes

        def decode(payload: bytearray) -> Request:
            obj = safe_pickle.loads(bytes(payload), records=records, max_bytes=max_bytes)
            return Request(legacy_observation(obj, cameras))

        return decode

    # -- reading and writing ----------------------------------------------

    async def _read_frames(self, reader: asyncio.StreamReader, frames: asyncio.Queue) -> None:
        """Put each payload on ``frames``, then ``None`` at a clean end or the framing error."""
        try:
            while True:
                header = await self._read_exactly(reader, HEADER.size, header=True)
                if header is None:
                    await frames.put(None)
                    return
                (length,) = HEADER.unpack(header)
                if length > self.max_frame_bytes:
                    raise _FrameTooLarge(f"frame of {length} bytes exceeds the {self.max_frame_bytes}-byte limit")
                await frames.put(await self._read_exactly(reader, length, header=False))
        except FrameError as exc:
            await frames.put(exc)
        except (ConnectionError, OSError):
            await frames.put(None)

    async def _read_exactly(self, reader: asyncio.StreamReader, size: int, *, header: bool) -> bytearray | None:
        """``size`` bytes; ``None`` at a clean end before the first byte; :class:`FrameError` otherwise.

        The buffer grows as bytes arrive (a length prefix alone allocates
        nothing), and each wait for more bytes is bounded: ``idle_timeout_s``
        before a length prefix, ``read_timeout_s`` inside a frame.
        """
        buffer = bytearray()
        what = "a length prefix" if header else f"the frame's {size} bytes"
        while len(buffer) < size:
            timeout = self.idle_timeout_s if header and not buffer else self.read_timeout_s
            try:
                chunk = await asyncio.wait_for(reader.read(min(size - len(buffer), _CHUNK)), timeout)
            except TimeoutError:
                if header and not buffer:
                    raise FrameError(f"connection idle for {timeout:g} s without a request: closed") from None
                raise FrameError(f"connection silent for {timeout:g} s inside {what} ({len(buffer)} of {size} bytes received): closed") from None
            if not chunk:
                if header and not buffer:
                    return None
                if header:
                    raise FrameError(f"connection ended inside a length prefix ({len(buffer)} of {size} bytes)")
                raise FrameError(f"connection ended after {len(buffer)} of {what}")
            buffer += chunk
        return buffer

    async def _send(self, writer: asyncio.StreamWriter, payload: bytes) -> None:
        writer.write(HEADER.pack(len(payload)) + payload)
        await writer.drain()

    async def _send_and_close(self, writer: asyncio.StreamWriter, payload: bytes) -> None:
        try:
            await asyncio.wait_for(self._send(writer, payload), 5.0)
        except (ConnectionError, OSError, TimeoutError):
            pass
        writer.close()


def _decode_msgpack(payload: bytearray) -> Request:
    return Request.from_map(unpackb(payload))


def _refuse_pickle(payload: bytearray) -> Request:
    raise ProtocolError("pickled payloads are refused: this server was not started with --trust-pickle; send msgpack")


def _encode_pickle(reply: dict[str, Any]) -> bytes:
    # Legacy clients expect one action per step.
    return pickle.dumps([np.array(row) for row in reply["actions"]], protocol=4)


def _error_map(failure: Failure) -> dict[str, str]:
    return {"error": failure.message, "kind": ErrorKind(failure.kind).value}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
