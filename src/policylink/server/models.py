"""A bounded cache of loaded models, shared by every client of one server.

Clients choose their model with a configure request; loading a checkpoint
takes seconds and gigabytes, so a model asked for again is reused. The model
a server was started with (``serve --policy.path``) is in the cache too,
*pinned*: never evicted, and found by a client that configures the same
checkpoint.

Bounds: at most ``max_models`` unpinned models and, optionally, at most
``memory_budget_bytes`` of model memory (a policy's ``memory_bytes``: a
LeRobot policy's weights and buffers, or on CUDA what loading and warming
it up allocated on the device, if more). Models are evicted *before* a new one loads, so
the budget holds at the peak too: a load whose estimated size cannot fit,
even after evicting every idle model, is refused with :class:`ServerBusy`.

A model is in use while a client session is attached to it or a request is
running on it (:meth:`ModelCache.retain` / :meth:`ModelCache.release` count
both); only models with no users are evicted, least recently used first.
Evicted models are handed to the ``close`` callback, which may run them down
on another thread.

Two clients asking for the same model at once trigger one load: the second
waits for the first's result.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from ..errors import ServerBusy

__all__ = ["ModelCache", "model_key"]

logger = logging.getLogger("policylink.server")


def model_key(request: Mapping[str, Any], device: str | None = None) -> tuple[str, str, str, str]:
    """What identifies a loaded model: checkpoint path, device, dtype, camera renames.

    A path is made absolute when it exists, so ``./ckpt`` and ``/abs/ckpt``
    share one cache entry. ``device`` overrides the request's device (the
    server passes the device ``auto`` resolves to, so ``auto`` and ``cuda``
    share an entry on a GPU server).
    """
    path = str(request.get("policy_path") or "")
    if path and os.path.exists(path):
        path = os.path.realpath(path)
    rename = request.get("rename_map") or ""
    if isinstance(rename, Mapping):
        rename = ",".join(f"{k}={v}" for k, v in sorted(rename.items()))
    device = str(device or request.get("device") or "auto").lower()
    dtype = str(request.get("dtype") or "float32").lower()
    return (path, device, dtype, str(rename))


@dataclasses.dataclass
class _Entry:
    model: Any
    users: int = 0
    memory_bytes: int = 0
    pinned: bool = False


def _memory_of(model: Any) -> int:
    return int(getattr(getattr(model, "policy", model), "memory_bytes", 0) or 0)


class ModelCache:
    """LRU cache of loaded models with use counts.

    ``loads`` counts models built, ``hits`` configure requests answered from
    the cache, ``evictions`` models evicted to stay within the bounds.
    """

    def __init__(
        self, max_models: int = 2, memory_budget_bytes: int | None = None, close: Callable[[Any], None] | None = None
    ) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.max_models = max_models
        #: Closes an evicted model (default ``model.close()``); it may be called on any thread.
        self.close_model: Callable[[Any], None] = close or (lambda model: model.close())
        self.memory_budget_bytes = memory_budget_bytes
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        self._loading: dict[Hashable, concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def memory_bytes(self) -> int:
        """Weights held by the cached models, as the models report them."""
        with self._lock:
            return self._held()

    def models(self) -> list[Any]:
        """The cached models, pinned ones included, least recently used first."""
        with self._lock:
            return [entry.model for entry in self._entries.values()]

    def pin(self, key: Hashable, model: Any) -> None:
        """Add a model that is never evicted (the one the server was started with)."""
        with self._lock:
            self._entries[key] = _Entry(model, memory_bytes=_memory_of(model), pinned=True)

    def acquire(self, key: Hashable, build: Callable[[], Any], estimate_bytes: int = 0) -> Any:
        """The model for ``key``, built with ``build()`` if not cached; counts one user.

        Blocking (it may load a model): call it from a worker thread. Every
        ``acquire`` must be paired with a :meth:`release` of the model.
        Before building, idle models are evicted to make room for
        ``estimate_bytes``; :class:`ServerBusy` if it cannot fit. Exceptions
        from ``build`` propagate to every waiter; nothing is cached.
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    entry.users += 1
                    self.hits += 1
                    return entry.model
                pending = self._loading.get(key)
                owner = pending is None
                evicted: list[Any] = []
                refusal = None
                if owner:
                    evicted, refusal = self._make_room_locked(estimate_bytes)
                    if refusal is None:
                        pending = self._loading[key] = concurrent.futures.Future()
            self._close(evicted)
            if refusal is not None:
                raise refusal
            if not owner:
                pending.result()  # raises the loader's error; on success, take it from the cache
                continue
            return self._build(key, build, pending)

    def _build(self, key: Hashable, build: Callable[[], Any], pending: concurrent.futures.Future[Any]) -> Any:
        try:
            model = build()
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._entries[key] = _Entry(model, users=1, memory_bytes=_memory_of(model))
            self.loads += 1
            self._loading.pop(key, None)
            evicted = self._evict_locked()
        pending.set_result(model)
        self._close(evicted)
        return model

    def retain(self, model: Any) -> None:
        """One more user of ``model`` (a running request); unknown models are ignored."""
        with self._lock:
            entry = self._find_locked(model)
            if entry is not None:
                entry.users += 1

    def release(self, model: Any) -> None:
        """A session or request stopped using ``model`` (unknown models are ignored); may evict."""
        with self._lock:
            entry = self._find_locked(model)
            if entry is not None:
                entry.users = max(0, entry.users - 1)
            evicted = self._evict_locked()
        self._close(evicted)

    def users(self, model: Any) -> int:
        with self._lock:
            entry = self._find_locked(model)
            return entry.users if entry is not None else 0

    def _find_locked(self, model: Any) -> _Entry | None:
        if model is None:
            return None
        return next((entry for entry in self._entries.values() if entry.model is model), None)

    # -- bounds -----------------------------------------------------------

    def _unpinned(self) -> int:
        return sum(1 for entry in self._entries.values() if not entry.pinned)

    def _held(self) -> int:
        return sum(entry.memory_bytes for entry in self._entries.values())

    def _make_room_locked(self, estimate_bytes: int) -> tuple[list[Any], ServerBusy | None]:
        """Evict idle models until one more model of ``estimate_bytes`` fits; the evicted and, if it cannot fit, the refusal."""
        budget = self.memory_budget_bytes
        evicted = self._evict_locked(extra_models=1, extra_bytes=estimate_bytes)
        if budget is not None and self._held() + estimate_bytes > budget:
            return evicted, ServerBusy(
                f"server busy: a model of about {estimate_bytes / 2**30:.2f} GiB does not fit the {budget / 2**30:.2f} GiB model budget "
                f"({self._held() / 2**30:.2f} GiB held by models in use); retry when a client lets go"
            )
        return evicted, None

    def _evict_locked(self, extra_models: int = 0, extra_bytes: int = 0) -> list[Any]:
        """Drop least recently used idle models until within bounds (with room for ``extra_*`` more); returns them to close."""
        evicted: list[Any] = []
        budget = self.memory_budget_bytes
        while self._unpinned() + extra_models > self.max_models or (budget is not None and self._held() + extra_bytes > budget):
            key = self._idle_locked()
            if key is None:
                logger.warning("model cache over its bound (%d models, %.2f GiB), but every model is in use", len(self._entries), self._held() / 2**30)
                break
            evicted.append(self._pop_locked(key))
        return evicted

    def _idle_locked(self) -> Hashable | None:
        return next((key for key, entry in self._entries.items() if entry.users == 0 and not entry.pinned), None)

    def _pop_locked(self, key: Hashable) -> Any:
        self.evictions += 1
        logger.info("evicting model %s from the cache", key[0] if isinstance(key, tuple) else key)
        return self._entries.pop(key).model

    def _close(self, models: list[Any]) -> None:
        for model in models:
            try:
                self.close_model(model)
            except Exception:  # closing must not break the request that triggered it
                logger.exception("closing an evicted model failed")

    def stats(self) -> dict[str, int]:
        """Counters for health checks and metrics."""
        return {"models_cached": len(self._entries), "models_loaded": self.loads, "model_cache_hits": self.hits, "models_evicted": self.evictions}

    def clear(self) -> list[Any]:
        """Forget every cached model; returns them for the caller to close."""
        with self._lock:
            models = [entry.model for entry in self._entries.values()]
            self._entries.clear()
        return models
