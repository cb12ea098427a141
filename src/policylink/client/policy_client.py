"""``PolicyClient``: the thin, torch-free client that runs on the robot."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ..codec import DEFAULT_MAX_MESSAGE_BYTES
from ..compression import check_image_codec, compress_images
from ..errors import ConnectionFailed, InferenceTimeout, ModelNotLoaded, NotAllowed, ProtocolError
from ..types import Observation, PolicyMetadata
from .transport import ConnectionLost, Transport
from .websocket import WebSocketTransport

__all__ = ["PolicyClient", "ActionChunk"]

logger = logging.getLogger("policylink.client")

_COMMAND_KEY = "__command__"


class ActionChunk(np.ndarray):
    """A ``(horizon, action_dim)`` float32 array that also carries the server's reply.

    It is a plain numpy array for arithmetic and indexing; the other reply
    fields are in :attr:`reply`, and ``chunk["actions"]`` /
    ``chunk["server_timing"]`` work as on openpi's reply dict.
    """

    reply: dict[str, Any]

    def __new__(cls, reply: dict[str, Any]) -> ActionChunk:
        actions = np.asarray(reply.get("actions"), dtype=np.float32)
        if actions.ndim == 1:
            actions = actions[None, :]
        if actions.ndim != 2:
            raise ProtocolError(f"reply 'actions' must be (horizon, action_dim), got shape {actions.shape}")
        chunk = actions.view(cls)
        chunk.reply = {**reply, "actions": actions}
        return chunk

    def __array_finalize__(self, obj: Any) -> None:
        self.reply = getattr(obj, "reply", {})

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.reply[key]
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.reply.get(key, default)

    def keys(self) -> Any:
        return self.reply.keys()

    @property
    def server_timing(self) -> dict[str, float]:
        return dict(self.reply.get("server_timing") or {})


class PolicyClient:
    """Talks to a policy server; ``client.infer(obs)`` returns an :class:`ActionChunk`.

    >>> client = PolicyClient("ws://gpu-box:8000")            # doctest: +SKIP
    >>> chunk = client.infer({"observation.state": state})    # doctest: +SKIP
    >>> chunk.shape                                           # doctest: +SKIP
    (16, 6)

    ``timeout`` bounds each request (seconds), reconnecting included: a call
    returns or raises within about its timeout, even while the server is
    down. ``connect_timeout`` bounds waiting for the server when the client
    is created. When the connection drops (server restart, network blip,
    expired session) the next call reconnects, re-sends the client's last
    configure request (checkpoint, device, dtype, task), and sends the
    request again once. A request that times out raises
    :class:`~policylink.errors.InferenceTimeout`; its late reply is thrown
    away when it arrives, and a policylink server drops the work.

    Errors are typed by what the server reports, not by message text:
    :class:`~policylink.errors.ServerBusy`, :class:`~policylink.errors.RequestError`,
    :class:`~policylink.errors.RequestTooLarge`, :class:`~policylink.errors.ModelNotLoaded`,
    :class:`~policylink.errors.Unauthorized`, :class:`~policylink.errors.NotAllowed`,
    :class:`~policylink.errors.ServerError` (a failing policy), and
    :class:`~policylink.errors.ConnectionFailed` /
    :class:`~policylink.errors.CertificateError` when the server cannot be reached.

    ``wss://`` and ``grpcs://`` speak TLS; ``ca_file`` names the PEM file of
    the CA that signed the server's certificate (default: the system's
    roots). ``grpc://host:port`` talks the typed gRPC protocol; it needs the
    ``[grpc]`` extra and behaves the same.

    ``image_codec="jpeg"`` sends camera frames (every ``HxWx3`` uint8 array)
    JPEG-compressed at ``quality`` (1-100), which pays off on links slower
    than about 1 Gbit/s (docs/protocol.md says when); it needs a JPEG coder
    (``pip install 'policylink[jpeg]'``). Raw arrays are the default. A
    server that does not announce JPEG in its metadata gets raw frames, with
    one warning.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        connect: bool = True,
        ca_file: str | None = None,
        image_codec: str | None = None,
        quality: int = 90,
    ) -> None:
        scheme = urlparse(url).scheme
        self.url = url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        #: How camera frames travel: ``raw`` arrays or ``jpeg`` (at :attr:`quality`).
        self.image_codec = check_image_codec(image_codec, quality)
        self.quality = quality
        self._raw_fallback_warned = False
        self._transport: Transport
        if scheme in ("ws", "wss"):
            self._transport = WebSocketTransport(url, api_key, connect_timeout, max_message_bytes, ca_file=ca_file)
        elif scheme in ("grpc", "grpcs"):
            try:  # grpc comes with the [grpc] extra only
                from .grpc import GrpcTransport
            except ImportError as exc:
                raise ImportError(f"{scheme}:// URLs need the grpc extra: pip install 'policylink[grpc]' ({exc})") from None
            # The typed protocol has a JPEG field of its own; its server always accepts it.
            jpeg_quality = quality if self.image_codec == "jpeg" else None
            self._transport = GrpcTransport(url, api_key, connect_timeout, max_message_bytes, ca_file=ca_file, jpeg_quality=jpeg_quality)
        else:
            raise ValueError(f"unsupported server URL {url!r}: expected ws://, wss://, grpc:// or grpcs://host:port")
        #: How many times the client reconnected after losing the server.
        self.reconnects = 0
        #: The last configure request, re-sent after every reconnect.
        self._configure_request: dict[str, Any] | None = None
        self._configured = True
        self._ever_connected = False
        #: ``(horizon, action_dim)`` of the last chunk: a plain server's metadata comes from it.
        self._seen_shape: tuple[int, int] | None = None
        if connect:
            self._connect(self.connect_timeout)

    # -- metadata ---------------------------------------------------------

    @property
    def server_metadata(self) -> dict[str, Any]:
        """The raw metadata frame of the current connection (connecting first if needed)."""
        if not self._transport.connected:
            self._ensure_session(time.monotonic() + self.connect_timeout)
        return self._transport.metadata_frame

    def get_server_metadata(self) -> dict[str, Any]:
        """Same as :attr:`server_metadata` (openpi-client's name)."""
        return self.server_metadata

    @property
    def speaks_policylink(self) -> bool:
        """Whether the server is policylink (its metadata frame names the protocol), not openpi's or another plain one.

        A plain server is never sent policylink's commands (``reset`` and
        ``configure``) or request fields (``__timeout_ms__``, ``__rtc__``...):
        openpi hands every map to its policy.
        """
        frame = self._transport.metadata_frame or self.server_metadata  # the last one known: no reconnect just to ask
        protocol = frame.get("protocol")
        return isinstance(protocol, str) and protocol.startswith("policylink")

    @property
    def metadata(self) -> PolicyMetadata | None:
        """The served policy's metadata, or ``None`` when the server is idle.

        A plain (openpi) server announces no action size: its metadata is
        built from the first reply's chunk, and is ``None`` until one came.
        """
        frame = self.server_metadata
        if self.speaks_policylink:
            if frame.get("status") == "idle" or "action_dim" not in frame:
                return None
            return PolicyMetadata.from_dict(frame)
        if "action_dim" in frame and "horizon" in frame:  # a plain server that announces its chunk after all
            return PolicyMetadata.from_dict({"policy_type": "openpi", **frame})
        if self._seen_shape is None:
            return None
        horizon, action_dim = self._seen_shape
        return PolicyMetadata(
            action_dim=action_dim, horizon=horizon, model_id=str(frame.get("model_id") or "openpi policy"),
            policy_type=str(frame.get("policy_type") or "openpi"),
            description="not a policylink server (openpi protocol): action size and horizon taken from its first reply",
        )

    # -- requests ---------------------------------------------------------

    def infer(self, obs: Observation, timeout: float | None = None) -> ActionChunk:
        """Send one observation; return the action chunk the policy computed for it."""
        if not isinstance(obs, Mapping):
            raise TypeError(f"obs must be a dict of arrays, got {type(obs).__name__}")
        sent = time.perf_counter()
        if not self._transport.metadata_frame:  # never connected: learn what the server speaks first
            self._ensure_session(time.monotonic() + (self.timeout if timeout is None else timeout))
        message = self._encoded(obs)
        if not self.speaks_policylink:  # a plain server hands every key to its policy: no policylink fields
            message = {key: value for key, value in message.items() if not (isinstance(key, str) and key.startswith("__"))}
        reply = self._request(message, timeout)
        if not isinstance(reply, dict) or "actions" not in reply:
            raise ProtocolError(f"server reply has no 'actions' (got {type(reply).__name__})")
        chunk = ActionChunk(reply)
        self._seen_shape = chunk.shape
        chunk.reply["client_timing"] = {"roundtrip_ms": (time.perf_counter() - sent) * 1e3}
        return chunk

    def _encoded(self, obs: Observation) -> dict[str, Any]:
        """The observation as it goes on the wire: camera frames JPEG-compressed when asked for and accepted."""
        if self.image_codec != "jpeg" or not isinstance(self._transport, WebSocketTransport):
            return dict(obs)
        if not self._transport.connected:
            self._ensure_session(time.monotonic() + self.connect_timeout)
        if "jpeg" not in (self._transport.metadata_frame.get("image_codecs") or ()):
            if not self._raw_fallback_warned:
                logger.warning("%s does not accept JPEG images (its metadata lists none); sending raw frames", self.url)
                self._raw_fallback_warned = True
            return dict(obs)
        return compress_images(obs, self.quality)

    def reset(self) -> None:
        """Ask the server to forget this client's episode state (a plain openpi server has none to forget: nothing is sent)."""
        if not self.speaks_policylink:
            logger.debug("%s is not a policylink server: reset sends nothing", self.url)
            return
        self._request({_COMMAND_KEY: "reset"}, None)

    def configure(self, policy_path: str, *, device: str | None = None, dtype: str | None = None, task: str | None = None, **options: Any) -> PolicyMetadata:
        """Ask the server to load ``policy_path`` and serve it to this client.

        The request is remembered and re-sent after any reconnect, so the
        client keeps its model across server restarts.
        """
        if not self.speaks_policylink:
            raise NotAllowed(f"the server at {self.url} is not a policylink server (openpi protocol): it serves one fixed policy and cannot load {policy_path}")
        request = {_COMMAND_KEY: "configure", "policy_path": str(policy_path), **options}
        request.update({key: value for key, value in (("device", device), ("dtype", dtype), ("task", task)) if value is not None})
        reply = self._request(request, max(self.timeout, 600.0))
        self._configure_request, self._configured = request, True
        return PolicyMetadata.from_dict(reply)

    def _request(self, message: dict[str, Any], timeout: float | None) -> Any:
        """Send ``message`` within ``timeout``: reconnect (and re-configure) once if the connection dropped."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        configure = message.get(_COMMAND_KEY) == "configure"
        for attempt in (1, 2):
            try:
                if not configure:
                    self._ensure_session(deadline)
                elif not self._transport.connected:
                    self._connect(_remaining(deadline))
                reply = self._transport.request(message, _remaining(deadline))
            except ConnectionLost as exc:
                self._transport.close()
                if attempt == 2:
                    raise ConnectionFailed(f"connection to {self.url} lost again after reconnecting: {exc}") from None
                logger.warning("lost the connection to %s (%s); reconnecting", self.url, exc)
                continue
            except ModelNotLoaded:
                # The server forgot this client's model (its session expired): configure again, once.
                if attempt == 2 or configure or self._configure_request is None:
                    raise
                self._configured = False
                continue
            if configure and isinstance(reply, dict):
                self._adopt_metadata(reply)
            return reply
        raise AssertionError("unreachable")

    def _ensure_session(self, deadline: float) -> None:
        """Connected, and configured as the user last asked, before ``deadline``."""
        if not self._transport.connected:
            self._connect(_remaining(deadline))
        if not self._configured and self._configure_request is not None:
            logger.info("re-sending configure (%s) to %s", self._configure_request["policy_path"], self.url)
            self._adopt_metadata(self._transport.request(self._configure_request, _remaining(deadline)))
            self._configured = True

    def _adopt_metadata(self, configure_reply: dict[str, Any]) -> None:
        """A configure reply is the new metadata frame of this connection."""
        self._transport.metadata_frame = {key: value for key, value in configure_reply.items() if key != "ok"}

    def _connect(self, timeout: float) -> None:
        self._transport.connect(timeout)
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._configured = self._configure_request is None

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; :class:`InferenceTimeout` when none are."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise InferenceTimeout("the request's time ran out while reconnecting")
    return remaining
