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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import ErrorKind, ProtocolError, RequestError, RequestTooLarge, Unauthorized
from . import safe_pickle
from .app import ServesInBlock
from .engine import COMMAND_KEY, PROTOCOL_VERSION, ClientSession, Engine, Failure, Outcome, Request

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


def legacy_observation(obj: Any, camera_names: Sequence[str], ctrl_space: str = "joint") -> dict[str, Any]:
    """Map a legacy pickled observation (a ``MetaObs``, or any object or dict with its fields) onto policylink's keys.

    - ``state`` -> ``observation.state``; without one, ``state_ee`` or
      ``state_joint``, whichever matches the policy's control space
      (``ctrl_space``);
    - ``image`` ``(K, C, H, W)`` -> one ``observation.images.<camera>``
      ``(H, W, C)`` per camera, named after the policy's cameras in order
      (``cam0``, ``cam1``, ... when it names none); float images in
      ``[0, 1]`` become uint8;
    - ``raw_lang`` -> ``task``.

    A leading batch dimension of 1 (``MetaObs.to_batch()``) is dropped; a
    larger batch is refused: one observation per request.
    """
    fields = obj if isinstance(obj, dict) else vars(obj) if hasattr(obj, "__dict__") else None
    if fields is None:
        raise RequestError(f"a pickled observation must be an object or dict with 'state', 'image', 'raw_lang', got {type(obj).__name__}")
    obs: dict[str, Any] = {}
    state = _legacy_state(fields, ctrl_space)
    if state is not None:
        obs["observation.state"] = state
    if fields.get("image") is not None:
        images = _unbatched(np.asarray(_numpy(fields["image"])), 4, "image", "(K, C, H, W)")
        if images.ndim == 3:
            images = images[None]
        for k, image in enumerate(images):
            name = camera_names[k] if k < len(camera_names) else f"cam{k}"
            obs[f"observation.images.{name}"] = _uint8(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
    language = fields.get("raw_lang")
    if isinstance(language, (list, tuple)) and len(language) == 1:  # a batched MetaObs carries a list
        language = language[0]
    if language:
        obs["task"] = str(language)
    if not obs:
        raise RequestError("the pickled observation has none of 'state', 'image', 'raw_lang'")
    return obs


def _legacy_state(fields: dict[str, Any], ctrl_space: str) -> np.ndarray | None:
    """``state``, else the state of the policy's control space (``state_ee`` / ``state_joint``)."""
    for key in ("state", f"state_{ctrl_space}"):
        if fields.get(key) is not None:
            state = _unbatched(np.asarray(_numpy(fields[key]), np.float32), 1, key, "(state_dim,)")
            return state.reshape(-1)
    return None


def _unbatched(array: np.ndarray, ndim: int, name: str, shape: str) -> np.ndarray:
    """``array`` without a leading batch dimension of 1; a larger batch or a wrong rank is refused."""
    if array.ndim == ndim + 1:
        if array.shape[0] != 1:
            raise RequestError(f"'{name}' is a batch of {array.shape[0]} observations (shape {array.shape}); send one observation per request")
        array = array[0]
    if array.ndim > ndim or (ndim > 1 and array.ndim < ndim - 1):
        raise RequestError(f"'{name}' must be {shape}, got shape {array.shape}")
    return array


def _uint8(image: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (or [0, 255]) as uint8; other dtypes as they are (the engine checks them)."""
    if image.dtype.kind != "f" or not np.all(np.isfinite(image)):
        return image
    scale = 255.0 if image.size and float(image.max()) <= 1.0 else 1.0
    return np.clip(np.rint(image * scale), 0, 255).astype(np.uint8)


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

    #: The protocol's name in logs and metrics.
    protocol = "tcp"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: admission, a session, the frame reader, then :meth:`_converse`."""
        if not self.engine.connections.try_open():
            logger.warning("refused a %s connection: %s", self.protocol, self.engine.connections.refusal())
            await self._send_and_close(writer, self._error_body(Failure(ErrorKind.BUSY, self.engine.connections.refusal())))
            return
        peer = writer.get_extra_info("peername")
        try:
            await self.engine.wait_ready()  # during warm-up the client waits for its first answer
        except BaseException:
            self.engine.connections.close()
            raise
        session = self.engine.open_session("%s:%s" % peer[:2] if peer else "", self.protocol, self.max_frame_bytes)
        frames: asyncio.Queue[bytearray | BaseException | None] = asyncio.Queue(maxsize=1)
        reading = asyncio.ensure_future(self._read_frames(reader, frames))
        try:
            await self._converse(session, frames, reading, writer)
        except (ConnectionError, OSError) as exc:
            logger.info("%s: connection lost: %s", session.client_id, exc)
        finally:
            reading.cancel()
            self.engine.close_session(session)
            self.engine.connections.close()
            writer.close()  # flushes what is buffered (an error frame), then closes

    async def _converse(self, session: ClientSession, frames: asyncio.Queue, reading: asyncio.Future, writer: asyncio.StreamWriter) -> None:
        """Metadata (or the API-key challenge) first, then one reply per frame."""
        packer = Packer()
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
            if not await self._reply(writer, self._answer(session, item, reading, packer)):
                break

    async def _reply(self, writer: asyncio.StreamWriter, answer: Any) -> bool:
        """Send what the ``answer`` coroutine gives; ``False`` when the client left before it was ready."""
        self.engine.begin()  # until the reply is sent: a draining server waits for it
        try:
            body = await answer
            if body is None:  # the client went away while its request was worked on: dropped
                return False
            await self._send(writer, body)
            return True
        finally:
            self.engine.end()

    def _error_body(self, failure: Failure) -> bytes:
        """A refusal in this protocol's form (a msgpack error map)."""
        return Packer().pack(_error_map(failure))

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
        outcome = await self._handled(session, payload, reading, decode, encode, quick)
        if outcome is None:
            return None
        if outcome.failure is None:
            return outcome.body
        if pickled and self.trust_pickle:
            return pickle.dumps({"error": outcome.failure.message, "kind": outcome.failure.kind.value}, protocol=4)
        return packer.pack(_error_map(outcome.failure))

    async def _handled(self, session: ClientSession, payload: bytearray, reading: asyncio.Future, decode: Any, encode: Any,
                       quick: Any = None) -> Outcome | None:
        """The engine's outcome for one frame; ``None`` when the client left first (the work is then dropped)."""
        work = asyncio.ensure_future(self.engine.handle(session, payload, decode, encode, quick_decode=quick))
        await asyncio.wait({work, reading}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the reader hit the end of the stream: nobody will read the reply
            work.cancel()
            return None
        return work.result()

    def _pickle_decoder(self, session: ClientSession) -> Any:
        cameras = session.model.metadata.camera_names if session.model else ()
        records = self.pickle_records
        max_bytes = self.max_frame_bytes

        def hint(exc: safe_pickle.ForbiddenGlobal) -> str:
            return (f"a legacy client's own observation class is admitted by name: start the server with --pickle-class "
                    f"{exc.module}:{exc.name} (never imported, rebuilt as attributes), or serve MetaObs/MetaAction clients on --legacy-tcp-port")

        def decode(payload: bytearray) -> Request:
            return Request(legacy_observation(load_pickle(payload, records, max_bytes, hint), cameras))

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


def load_pickle(payload: bytearray, records: Sequence[str], max_bytes: int, hint: Callable[[safe_pickle.ForbiddenGlobal], str]) -> Any:
    """:func:`safe_pickle.loads` of a frame; a refused global's message gets ``hint(exc)``: how this port admits a class."""
    try:
        return safe_pickle.loads(bytes(payload), records=records, max_bytes=max_bytes)
    except safe_pickle.ForbiddenGlobal as exc:
        raise safe_pickle.ForbiddenGlobal(f"{exc}; {hint(exc)}", exc.module, exc.name) from None


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
