"""The model cache under real traffic: references per session and per request, eviction off the event loop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import EchoPolicy, GatedPolicy, wait_until
from websockets.sync.client import connect

from policylink import PolicyClient
from policylink.codec import packb
from policylink.errors import ServerBusy
from policylink.policies import ConstantPolicy
from policylink.server.engine import Engine
from policylink.server.models import ModelCache

STATE = {"observation.state": np.zeros(6, np.float32)}


class Recorder(GatedPolicy):
    """Records infer/close order; a ``hold`` request waits for :attr:`gate`; close takes :attr:`close_s`."""

    def __init__(self, close_s: float = 0.0) -> None:
        super().__init__()
        self.closing = threading.Event()
        self.closed = threading.Event()
        self.close_s = close_s
        self.events: list[str] = []

    def infer(self, obs):
        reply = super().infer(obs)
        self.events.append("infer done")
        return reply

    def close(self) -> None:
        self.closing.set()
        time.sleep(self.close_s)  # a real model frees GPU memory here, after its last forward pass
        self.events.append("closed")
        self.closed.set()


def test_a_configure_cancelled_by_a_disconnect_releases_its_model(serve):
    loading, gate = threading.Event(), threading.Event()

    def loader(request):
        if request["policy_path"] == "slow":
            loading.set()
            assert gate.wait(30)
        return ConstantPolicy(value=1.0)

    engine = Engine(None, loader=loader, max_models=1)
    server = serve(engine)
    with connect(server.url) as ws:
        ws.recv(timeout=5)
        ws.send(packb({"__command__": "configure", "policy_path": "slow"}))
        assert loading.wait(10)
    wait_until(lambda: not engine.sessions, "the server to notice the disconnect")
    gate.set()
    wait_until(lambda: engine.models.loads == 1, "the load to finish")
    (orphan,) = engine.models.models()
    wait_until(lambda: engine.models.users(orphan) == 0, "the orphaned load's reference to be released")
    with PolicyClient(server.url) as client:
        client.configure("fast")  # max_models=1: the orphan must be evictable
    assert engine.models.evictions == 1 and orphan not in engine.models.models()


def test_eviction_waits_for_running_requests_and_closes_off_the_event_loop(serve):
    first = Recorder(close_s=1.0)
    engine = Engine(None, loader=lambda request: first if request["policy_path"] == "first" else ConstantPolicy(value=2.0), max_models=1)
    server = serve(engine)
    user = connect(server.url, legacy=True)  # closed by hand below, while its request runs
    user.recv(timeout=5)
    user.send(packb({"__command__": "configure", "policy_path": "first"}))
    user.recv(timeout=10)
    user.send(packb({"tag": 1.0, "hold": 1}))
    first.wait_started(1)
    with PolicyClient(server.url, timeout=30) as other:
        user.close()  # the session ends while its request still runs on the model
        wait_until(lambda: len(engine.sessions) == 1, "the server to close the first session")
        other.configure("second")  # max_models=1: "first" is evicted...
        assert engine.models.evictions == 1
        assert not first.closing.is_set(), "closed while a request was still running on it"
        first.gate.set()  # ...and closed only once its running request is done
        assert first.closing.wait(10)
        # The close takes a second, on a thread: the event loop keeps answering meanwhile.
        assert other.infer(STATE)[0, 0] == 2.0
        assert not first.closed.is_set(), "the request waited for the close: it ran on the event loop"
    assert first.closed.wait(10)
    assert first.events == ["infer done", "closed"]


def test_the_served_model_is_shared_with_configure(serve, tmp_path):
    loads = []
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    served = EchoPolicy()
    engine = Engine(served, loader=lambda request: loads.append(request) or ConstantPolicy(), policy_request={"policy_path": str(checkpoint), "device": "cpu"},
                    resolve_device=lambda device: "cpu" if device == "auto" else device)
    server = serve(engine)
    with PolicyClient(server.url) as client:
        assert client.configure(str(checkpoint) + "/", device="cpu").model_id == "test/echo"
        assert client.configure(str(checkpoint)).model_id == "test/echo"  # "auto" is cpu on this server
        assert client.infer({"tag": 7.0})[0, 0] == 7.0
    assert loads == [] and engine.models.hits == 2 and served.calls == 1


# -- the bounds themselves -----------------------------------------------------------------


class Model:
    def __init__(self, name: str, memory_bytes: int) -> None:
        self.name, self.memory_bytes, self.closed = name, memory_bytes, False

    def close(self) -> None:
        self.closed = True


def test_idle_models_are_evicted_before_a_load_so_the_budget_holds_at_the_peak():
    cache = ModelCache(max_models=10, memory_budget_bytes=250)
    a, b = cache.acquire("a", lambda: Model("a", 100), 100), cache.acquire("b", lambda: Model("b", 100), 100)
    cache.release(a)
    cache.release(b)
    held_while_loading = []

    def build_c():
        held_while_loading.append(cache.memory_bytes)
        return Model("c", 100)

    cache.acquire("c", build_c, 100)
    assert held_while_loading == [100], "the load must start with room for it, not evict afterwards"
    assert a.closed and not b.closed and cache.memory_bytes == 200


def test_a_model_that_cannot_fit_is_refused_clearly():
    cache = ModelCache(max_models=10, memory_budget_bytes=150 * 2**20)
    in_use = cache.acquire("a", lambda: Model("a", 100 * 2**20), 100 * 2**20)
    with pytest.raises(ServerBusy, match=r"about 0.10 GiB does not fit the 0.15 GiB model budget \(0.10 GiB held by models in use\)"):
        cache.acquire("b", lambda: Model("b", 100 * 2**20), 100 * 2**20)
    assert "b" not in cache and not in_use.closed
    cache.release(in_use)
    assert cache.acquire("b", lambda: Model("b", 100 * 2**20), 100 * 2**20).name == "b"  # the idle one is evicted first
    assert in_use.closed
