"""Legacy pickle clients, unchanged: ``MetaObs`` in, a list of ``MetaAction`` out.

Clients written for the MetaObs / MetaAction pickle-over-TCP servers speak
length-prefixed TCP (4-byte big-endian length + payload, both ways) without
a metadata frame: they connect, send a pickled ``MetaObs`` and read one
reply, a pickled list of their own ``MetaAction`` objects, one per step of
the chunk. :class:`LegacyTcpServer` serves them on a port of its own
(``policylink serve --legacy-tcp-port P --trust-pickle``):

- ``MetaObs`` (from the client's module, ``benchmark.base`` unless told
  otherwise) is admitted *by name* through the restricted unpickler of
  :mod:`.safe_pickle`: it is rebuilt as a plain attribute bag and the
  client's code is never imported. Its fields are mapped by
  :func:`~.tcp.legacy_observation`.
- The reply is written by :func:`dump_meta_actions`: a pickle that names the
  client's ``MetaAction`` class by module and name (the server never imports
  it either), with ``ctrl_space`` / ``ctrl_type`` / ``gripper_continuous``
  from the served policy's declared action space and ``action`` as a float32
  array. The client's own ``pickle.loads`` builds its ``MetaAction``s.
- A refused request is answered with :func:`dump_error`: a pickle whose
  loading raises ``ValueError`` carrying the server's message. Such clients
  catch and log what ``pickle.loads`` raises (then report an empty action
  list), so the reason shows in their own log, and nothing reaches the
  robot. The legacy servers themselves answered an empty list, with no
  reason.

The framing, timeouts, size limits and drain are :class:`~.tcp.TcpServer`'s.
Such clients cannot send an API key, so the command refuses this port on a
server that has one.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..action_space import ActionSpace
from ..errors import ErrorKind, ProtocolError
from . import safe_pickle
from .engine import ClientSession, Engine, Failure, Request
from .tcp import TcpServer, _looks_pickled, legacy_observation, load_pickle

__all__ = ["LegacyTcpServer", "LEGACY_MODULE", "dump_meta_actions", "dump_error", "ERROR_PREFIX"]

logger = logging.getLogger("policylink.server")

#: The module legacy clients define ``MetaObs`` and ``MetaAction`` in.
LEGACY_MODULE = "benchmark.base"
#: Starts the message a refused legacy client sees in its log.
ERROR_PREFIX = "policylink server refused the request"
#: Pickle protocol of replies: what Python 3.8+ writes by default, readable by every Python 3.4+.
_PROTOCOL = 4
#: Marks a stand-in class that is pickled by name only.
_FOREIGN = "_policylink_foreign_name"


class LegacyTcpServer(TcpServer):
    """Serves legacy ``MetaObs`` / ``MetaAction`` pickle clients on length-prefixed TCP.

    ``module`` is the module the clients' classes live in (default
    :data:`LEGACY_MODULE`). Pickles are always admitted here (restricted
    unpickler); the command asks for ``--trust-pickle`` before opening the port.
    """

    protocol = "legacy-tcp"

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 5000, *, module: str = LEGACY_MODULE, **options: Any) -> None:
        if not module or not all(part.isidentifier() for part in module.split(".")):
            raise ValueError(f"bad legacy module name {module!r}: expected a dotted Python module name, e.g. {LEGACY_MODULE}")
        super().__init__(engine, host, port, trust_pickle=True, pickle_records=(f"{module}:MetaObs",), **options)
        self.module = module

    async def start(self) -> None:
        await super().start()
        logger.info("legacy pickle clients (%s.MetaObs / MetaAction) on tcp://%s:%d", self.module, self.host, self.port)

    async def _converse(self, session: ClientSession, frames: asyncio.Queue, reading: asyncio.Future, writer: asyncio.StreamWriter) -> None:
        """No metadata frame: the client speaks first; one reply per frame."""
        while True:
            item = await frames.get()
            if item is None:
                break
            if isinstance(item, BaseException):  # the framing broke: say why, then close
                await self._send(writer, self._error_body(self.engine.refuse(session, item)))
                break
            if not await self._reply(writer, self._answer_legacy(session, item, reading)):
                break

    async def _answer_legacy(self, session: ClientSession, payload: bytearray, reading: asyncio.Future) -> bytes | None:
        """The pickled ``MetaAction`` list (or error) for one frame; ``None`` when the client left first."""
        outcome = await self._handled(session, payload, reading, self._decoder(session), functools.partial(self._encode, session))
        if outcome is None:
            return None
        return outcome.body if outcome.failure is None else self._error_body(outcome.failure)

    def _decoder(self, session: ClientSession) -> Any:
        metadata = session.model.metadata if session.model else None
        cameras = metadata.camera_names if metadata else ()
        ctrl_space = metadata.control.ctrl_space if metadata else "joint"
        records, max_bytes, module = self.pickle_records, self.max_frame_bytes, self.module

        def hint(exc: safe_pickle.ForbiddenGlobal) -> str:
            return f"this port admits {module}.MetaObs (if your client's classes live in another module, start the server with --legacy-module {exc.module})"

        def decode(payload: bytearray) -> Request:
            try:
                obj = load_pickle(payload, records, max_bytes, hint)
            except safe_pickle.ForbiddenGlobal:
                raise
            except ProtocolError as exc:
                if _looks_pickled(payload):
                    raise
                raise ProtocolError(f"{exc}; this legacy port takes pickled MetaObs frames (msgpack clients use --tcp-port or the WebSocket port)") from None
            return Request(legacy_observation(obj, cameras, ctrl_space))

        return decode

    def _encode(self, session: ClientSession, reply: dict[str, Any]) -> bytes:
        control = session.model.metadata.control if session.model else ActionSpace()
        return dump_meta_actions(reply["actions"], control, self.module)

    def _error_body(self, failure: Failure) -> bytes:
        return dump_error(f"{ERROR_PREFIX} ({ErrorKind(failure.kind).value}): {failure.message}")


# --------------------------------------------------------------------------- writing the client's classes


class _ForeignPickler(pickle._Pickler):  # type: ignore[name-defined]  # the pure-Python pickler: its save_global can be overridden
    """Writes stand-in classes by their module and name, without importing (or checking) them."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        foreign = vars(obj).get(_FOREIGN) if isinstance(obj, type) else None
        if foreign is None:
            super().save_global(obj, name)
            return
        module, qualname = foreign
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


@functools.lru_cache(maxsize=16)
def _stand_in(module: str, name: str) -> type:
    """A class pickled as ``module.name``; the client's unpickler resolves that name to its own class."""
    return type(name, (), {"__module__": module, "__qualname__": name, _FOREIGN: (module, name)})


def dump_meta_actions(actions: Any, control: ActionSpace, module: str = LEGACY_MODULE) -> bytes:
    """The pickled list of ``module.MetaAction`` objects for a ``(horizon, action_dim)`` chunk, one per step.

    Each carries ``ctrl_space``, ``ctrl_type``, ``action`` (float32
    ``(action_dim,)``) and ``gripper_continuous``, set the way the client's
    dataclass sets them (by its unpickler, without calling ``__init__``).
    """
    rows = np.asarray(actions, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"a chunk must be (horizon, action_dim), got shape {rows.shape}")
    meta_action = _stand_in(module, "MetaAction")
    items = []
    for row in rows:
        item = object.__new__(meta_action)
        item.__dict__.update(ctrl_space=control.ctrl_space, ctrl_type=control.ctrl_type, action=row.copy(),
                             gripper_continuous=control.gripper_continuous)
        items.append(item)
    buffer = io.BytesIO()
    _ForeignPickler(buffer, protocol=_PROTOCOL).dump(items)
    return buffer.getvalue()


class _RaiseOnLoad:
    """Pickles as ``float(message)``: loading it raises ``ValueError`` with the message in its text."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __reduce__(self) -> tuple[Any, Sequence[Any]]:
        return (float, (self.message,))


def dump_error(message: str) -> bytes:
    """A reply whose ``pickle.loads`` raises ``ValueError: could not convert string to float: '<message>'``.

    Nothing but the builtin ``float`` is named, so no client code runs and nothing is imported.
    """
    return pickle.dumps(_RaiseOnLoad(message), protocol=_PROTOCOL)
