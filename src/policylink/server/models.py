"""A bounded cache of loaded models, shared by every client of one server.

Clients choose their model with a configure request; loading a checkpoint
takes seconds and gigabytes, so a model asked for again is reused. The cache
holds at most ``max_models`` models and, optionally, at most
``memory_budget_bytes`` of weights (as reported by a policy's
``memory_bytes`` attribute). When over a bound, the least recently used model
that no client is using is evicted and closed; a model in use is never
evicted under a client's feet (the cache then stays over its bound until a
client lets go).

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
from typing import Any, Protocol

__all__ = ["ModelCache", "model_key"]

logger = logging.getLogger("policylink.server")


class Closable(Protocol):
    def close(self) -> None: ...


def model_key(request: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """What identifies a loaded model: checkpoint path, device, dtype, camera renames.

    A path is made absolute when it exists, so ``./ckpt`` and ``/abs/ckpt``
    share one cache entry.
    """
    path = str(request.get("policy_path") or "")
    if path and os.path.exists(path):
        path = os.path.realpath(path)
    rename = request.get("rename_map") or ""
    if isinstance(rename, Mapping):
        rename = ",".join(f"{k}={v}" for k, v in sorted(rename.items()))
    device = str(request.get("device") or "auto").lower()
    dtype = str(request.get("dtype") or "float32").lower()
    return (path, device, dtype, str(rename))


@dataclasses.dataclass
class _Entry:
    model: Any
    users: int = 0
    memory_bytes: int = 0


class ModelCache:
    """LRU cache of loaded models with use counts.

    ``loads`` counts models built, ``hits`` configure requests answered from
    the cache, ``evictions`` models closed to stay within the bounds.
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
            return sum(entry.memory_bytes for entry in self._entries.values())

    def acquire(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The model for ``key``, built with ``build()`` if not cached; counts one user.

        Blocking (it may load a model): call it from a worker thread. Every
        ``acquire`` must be paired with a :meth:`release` of the model.
        Exceptions from ``build`` propagate to every waiter; nothing is cached.
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
                if owner:
                    pending = self._loading[key] = concurrent.futures.Future()
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
        memory = int(getattr(getattr(model, "policy", model), "memory_bytes", 0) or 0)
        with self._lock:
            self._entries[key] = _Entry(model, users=1, memory_bytes=memory)
            self.loads += 1
            self._loading.pop(key, None)
            evicted = self._evict_locked()
        pending.set_result(model)
        self._close(evicted)
        return model

    def release(self, model: Any) -> None:
        """A client stopped using ``model`` (unknown models are ignored)."""
        with self._lock:
            for entry in self._entries.values():
                if entry.model is model:
                    entry.users = max(0, entry.users - 1)
                    break
            evicted = self._evict_locked()
        self._close(evicted)

    def _over_bounds(self) -> bool:
        if len(self._entries) > self.max_models:
            return True
        budget = self.memory_budget_bytes
        return budget is not None and len(self._entries) > 1 and sum(e.memory_bytes for e in self._entries.values()) > budget

    def _evict_locked(self) -> list[Any]:
        """Drop least recently used idle models until within bounds; returns them to close."""
        evicted: list[Any] = []
        while self._over_bounds():
            idle = next((key for key, entry in self._entries.items() if entry.users == 0), None)
            if idle is None:
                logger.warning("model cache over its bound (%d models), but every model is in use", len(self._entries))
                break
            evicted.append(self._entries.pop(idle).model)
            self.evictions += 1
            logger.info("evicted model %s from the cache", idle)
        return evicted

    def _close(self, models: list[Closable]) -> None:
        for model in models:
            try:
                self.close_model(model)
            except Exception:  # closing must not break the request that triggered it
                logger.exception("closing an evicted model failed")

    def stats(self) -> dict[str, int]:
        """Counters for health checks and metrics."""
        return {"models_cached": len(self._entries), "models_loaded": self.loads, "model_cache_hits": self.hits, "models_evicted": self.evictions}

    def close(self) -> None:
        """Close every cached model."""
        with self._lock:
            models = [entry.model for entry in self._entries.values()]
            self._entries.clear()
        for model in models:
            model.close()
