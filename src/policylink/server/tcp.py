"""Length-prefixed TCP for legacy clients.

Every frame, both ways, is a 4-byte big-endian unsigned length followed by
that many payload bytes. The conversation is the WebSocket protocol's:

1. the server sends the metadata map as the first frame;
2. each client frame is an observation map (or a ``{"__command__": ...}``
   map); the server answers with the reply map (``actions``,
   ``server_timing``);
3. a refused request is answered with ``{"error": "<what is wrong>"}`` and
   the connection stays open.

Payloads are msgpack (policylink / openpi encoding of numpy arrays). With
``trust_pickle`` a client may instead send a pickled observation object
(a pickle starts with ``0x80`` and a protocol byte, which no useful msgpack
map does): it is unpickled with :mod:`.safe_pickle`, its fields are mapped
(see :func:`legacy_observation`), and the reply is a pickled list of
per-step action arrays (``{"error": ...}`` on failure).

A frame longer than ``max_frame_bytes`` or a connection that ends inside a
length prefix or a payload is answered with an error frame (where the socket
is still writable) and closed; other clients are not affected.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, Packer, unpackb
from ..errors import ProtocolError, RequestError, ServerBusy
from . import safe_pickle
from .app import ServesInBlock
from .engine import COMMAND_KEY, ClientSession, Engine

__all__ = ["TcpServer", "legacy_observation", "read_frame", "write_frame", "HEADER"]

logger = logging.getLogger("policylink.server")

#: The length prefix: 4-byte big-endian unsigned.
HEADER = struct.Struct(">I")


class FrameError(ProtocolError):
    """The byte stream broke the framing; the connection cannot continue."""


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int) -> bytes | None:
    """One payload, or ``None`` at a clean end of stream; :class:`FrameError` otherwise."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(f"connection ended inside a length prefix ({len(exc.partial)} of {HEADER.size} bytes)") from None
    (length,) = HEADER.unpack(header)
    if length > max_frame_bytes:
        raise FrameError(f"frame of {length} bytes exceeds the {max_frame_bytes}-byte limit")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"connection ended after {len(exc.partial)} of the frame's {length} bytes") from None


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(HEADER.pack(len(payload)) + payload)


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
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.trust_pickle = trust_pickle
        self.pickle_records = tuple(pickle_records)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=2**20)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("TCP server listening on tcp://%s:%d%s", self.host, self.port, " (pickle admitted)" if self.trust_pickle else "")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        session = self.engine.open_session("%s:%s" % peer[:2] if peer else "")
        packer = Packer()
        try:
            write_frame(writer, packer.pack(self.engine.metadata_frame(session)))
            await writer.drain()
            while True:
                try:
                    payload = await read_frame(reader, self.max_frame_bytes)
                except FrameError as exc:
                    self._refused(session, exc)
                    write_frame(writer, packer.pack({"error": str(exc)}))
                    await writer.drain()
                    break
                if payload is None:
                    break
                write_frame(writer, await self._answer(session, payload, packer))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.info("%s: connection lost: %s", session.client_id, exc)
        finally:
            self.engine.close_session(session)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _answer(self, session: ClientSession, payload: bytes, packer: Packer) -> bytes:
        looks_pickled = len(payload) > 1 and payload[0] == 0x80 and payload[1] <= pickle.HIGHEST_PROTOCOL
        pickled = looks_pickled and self.trust_pickle  # untrusted: the refusal is msgpack too
        started = time.perf_counter()
        try:
            if looks_pickled:
                return await self._answer_pickle(session, payload)
            reply = await self._answer_msgpack(session, payload)
        except (RequestError, ProtocolError, ServerBusy) as exc:
            return self._error(session, str(exc), pickled, packer, exc)
        except Exception as exc:  # a broken policy must not take the server down
            logger.exception("%s: inference failed", session.client_id)
            return self._error(session, f"inference failed: {type(exc).__name__}: {exc}", pickled, packer, exc)
        self.engine.record_total(session, (time.perf_counter() - started) * 1e3)
        self.engine.metrics.request_done("tcp", reply, time.perf_counter() - started)
        return packer.pack(reply)

    async def _answer_msgpack(self, session: ClientSession, payload: bytes) -> dict[str, Any]:
        request = unpackb(payload)
        if not isinstance(request, dict):
            raise RequestError(f"a request must be a msgpack map, got {type(request).__name__}")
        if COMMAND_KEY in request:
            return await self.engine.command(session, request)
        return await self.engine.infer(session, request)

    async def _answer_pickle(self, session: ClientSession, payload: bytes) -> bytes:
        if not self.trust_pickle:
            raise ProtocolError("pickled payloads are refused: this server was not started with --trust-pickle; send msgpack")
        obj = safe_pickle.loads(payload, records=self.pickle_records)
        cameras = session.model.metadata.camera_names if session.model else ()
        reply = await self.engine.infer(session, legacy_observation(obj, cameras))
        # Legacy clients expect one action per step.
        return pickle.dumps([np.array(row) for row in reply["actions"]], protocol=4)

    def _error(self, session: ClientSession, message: str, pickled: bool, packer: Packer, exc: BaseException) -> bytes:
        self._refused(session, exc, message)
        if pickled:
            return pickle.dumps({"error": message}, protocol=4)
        return packer.pack({"error": message})

    def _refused(self, session: ClientSession, exc: BaseException, message: str | None = None) -> None:
        session.errors += 1
        self.engine.metrics.request_failed("tcp", exc)
        logger.warning("%s: request refused: %s", session.client_id, message or exc)
