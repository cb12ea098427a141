"""Idle server, client-chosen models, and the bounded model cache."""

from __future__ import annotations

import json
import subprocess
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lerobot")
pytestmark = pytest.mark.lerobot

import torch  # noqa: E402

from conftest import POLICYLINK, free_port, wait_healthy  # noqa: E402
from lerobot_checkpoints import act_dir, diffusion_dir  # noqa: E402,F401
from policylink import PolicyClient  # noqa: E402
from policylink.backends.lerobot import load_from_request  # noqa: E402
from policylink.errors import ServerError  # noqa: E402
from policylink.server.engine import Engine  # noqa: E402
from policylink.server.models import ModelCache, model_key  # noqa: E402
from policylink.types import Policy  # noqa: E402


def idle_server(serve, loader=load_from_request, **engine_options):
    return serve(Engine(None, loader=loader, **engine_options))


def act_obs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation.state": rng.normal(size=6).astype(np.float32), "observation.images.front": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)}


def diffusion_obs() -> dict:
    return {"observation.state": np.zeros(6, np.float32), "observation.images.front": np.zeros((32, 32, 3), np.uint8)}


def healthz(server) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
        return json.loads(response.read())


def test_idle_server_loads_on_configure_and_reuses_the_model(serve, act_dir):
    server = idle_server(serve)
    with PolicyClient(server.url) as first:
        assert first.metadata is None  # idle until configured
        meta = first.configure(str(act_dir), device="cpu")
        assert (meta.policy_type, meta.horizon, meta.action_dim) == ("act", 16, 6)
        assert first.metadata.model_id == str(act_dir)
        chunk_1 = first.infer(act_obs(1))
        with PolicyClient(server.url) as second:
            # Same checkpoint, device and dtype (path spelled differently): no second load.
            second.configure(str(act_dir) + "/", device="cpu")
            chunk_2 = second.infer(act_obs(1))
    assert server.engine.models.loads == 1
    assert server.engine.models.hits == 1
    np.testing.assert_array_equal(chunk_1, chunk_2)
    health = healthz(server)
    assert health["models_loaded"] == 1 and health["models_cached"] == 1


def test_two_clients_use_two_models_at_once(serve, act_dir, diffusion_dir):
    server = idle_server(serve)
    with PolicyClient(server.url) as a, PolicyClient(server.url) as b:
        a.configure(str(act_dir), device="cpu")
        b.configure(str(diffusion_dir), device="cpu")
        results: dict[str, list] = {"a": [], "b": []}

        def drive(client, name, make_obs):
            for _ in range(3):
                results[name].append(client.infer(make_obs()).shape)

        threads = [threading.Thread(target=drive, args=(a, "a", act_obs)), threading.Thread(target=drive, args=(b, "b", diffusion_obs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert results == {"a": [(16, 6)] * 3, "b": [(8, 6)] * 3}
    assert server.engine.models.loads == 2


def test_lru_eviction_spares_models_in_use(serve, act_dir, diffusion_dir):
    server = idle_server(serve, max_models=1)
    models = server.engine.models
    with PolicyClient(server.url) as a:
        a.configure(str(act_dir), device="cpu")
        with PolicyClient(server.url) as b:
            b.configure(str(diffusion_dir), device="cpu")
            # Over the bound, but ACT is in use by a: nothing evicted, both still serve.
            assert len(models) == 2 and models.evictions == 0
            assert a.infer(act_obs()).shape == (16, 6)
            assert b.infer(diffusion_obs()).shape == (8, 6)
        # b left: its idle Diffusion model is now evicted.
        deadline = time.monotonic() + 10
        while models.evictions == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert models.evictions == 1 and len(models) == 1
        assert a.infer(act_obs()).shape == (16, 6)
    with PolicyClient(server.url) as c:
        c.configure(str(diffusion_dir), device="cpu")  # evicted earlier: loaded again
        assert c.infer(diffusion_obs()).shape == (8, 6)
    assert models.loads == 3


def test_configure_task_is_the_default_prompt(serve, act_dir):
    seen: list = []

    class Recording(Policy):
        """The real ACT policy, plus a record of the task each request carried."""

        def __init__(self, inner):
            self.inner = inner

        metadata = property(lambda self: self.inner.metadata)

        def infer(self, obs):
            seen.append(obs.get("task"))
            return self.inner.infer(obs)

    server = idle_server(serve, loader=lambda request: Recording(load_from_request(request)))
    with PolicyClient(server.url) as client:
        client.configure(str(act_dir), device="cpu", task="stack the red cube")
        client.infer(act_obs())
        client.infer({**act_obs(), "task": "lift the cube"})
    assert seen == ["stack the red cube", "lift the cube"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "does not exist"),
        ("no_config", "config.json missing"),
        ("bad_config", "could not load checkpoint"),
        ("bad_weights", "could not load checkpoint"),
    ],
)
def test_unknown_or_broken_checkpoint_is_a_clear_error_and_server_stays_up(serve, act_dir, tmp_path, damage, message):
    broken = tmp_path / "ckpt"
    if damage != "missing":
        shutil.copytree(act_dir, broken)
    if damage == "no_config":
        (broken / "config.json").unlink()
    elif damage == "bad_config":
        (broken / "config.json").write_text("{ not json")
    elif damage == "bad_weights":
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    server = idle_server(serve)
    with PolicyClient(server.url) as client:
        with pytest.raises(ServerError, match=message):
            client.configure(str(broken), device="cpu")
        assert client.metadata is None  # still idle, still connected
        client.configure(str(act_dir), device="cpu")
        assert client.infer(act_obs()).shape == (16, 6)
    assert server.engine.models.loads == 1  # failures are not cached


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"device": "cpu", "rename_map": "top"}, "bad rename 'top'"),
    ],
)
def test_bad_configure_options_are_named(serve, act_dir, options, message):
    server = idle_server(serve)
    with PolicyClient(server.url) as client:
        with pytest.raises(ServerError, match=message):
            client.configure(str(act_dir), **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_server_is_refused_clearly(serve, act_dir):
    server = idle_server(serve)
    with PolicyClient(server.url) as client:
        with pytest.raises(ServerError, match="no CUDA device"):
            client.configure(str(act_dir), device="cuda:0")


def test_mixed_precision_is_opt_in_and_close_to_float32(serve, act_dir):
    server = idle_server(serve)
    obs = act_obs(7)
    with PolicyClient(server.url) as full, PolicyClient(server.url) as half:
        full.configure(str(act_dir), device="cpu")
        meta = half.configure(str(act_dir), device="cpu", dtype="bfloat16")
        assert "bfloat16" in meta.description
        reference, mixed = np.asarray(full.infer(obs)), np.asarray(half.infer(obs))
    assert server.engine.models.loads == 2  # a different dtype is a different model
    assert not np.array_equal(reference, mixed)
    np.testing.assert_allclose(mixed, reference, atol=0.1 * np.abs(reference).max())


def test_server_without_loader_refuses_configure(serve, act_dir):
    server = serve(Engine(None))
    with PolicyClient(server.url) as client:
        with pytest.raises(ServerError, match="cannot load models"):
            client.configure(str(act_dir))


# -- the cache itself ---------------------------------------------------------


class Model:
    def __init__(self, name: str, memory_bytes: int = 0) -> None:
        self.name, self.memory_bytes, self.closed = name, memory_bytes, False

    def close(self) -> None:
        self.closed = True


def test_cache_builds_once_for_concurrent_requests():
    import sys

    def waiting_in_acquire(thread: threading.Thread) -> bool:
        """Whether ``thread`` is blocked in a ``threading`` wait (a future's, an event's) called from ModelCache.acquire."""
        frame = sys._current_frames().get(thread.ident)
        if frame is None or frame.f_code.co_name != "wait" or not frame.f_code.co_filename.endswith("threading.py"):
            return False
        while frame is not None:
            if frame.f_code.co_name == "acquire" and frame.f_code.co_filename.endswith("server/models.py"):
                return True
            frame = frame.f_back
        return False

    cache = ModelCache(max_models=2)
    started, release = threading.Event(), threading.Event()
    builds: list[threading.Thread] = []

    def build():
        builds.append(threading.current_thread())
        started.set()
        assert release.wait(10), "the test never let the load finish"  # a slow load, until the others wait for it
        return Model("x")

    got: list = []
    threads = [threading.Thread(target=lambda: got.append(cache.acquire("x", build))) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        assert started.wait(10), "no thread started the load"
        # The two others are inside acquire, blocked on the load in progress (not loading again,
        # not yet returned); a cache without the shared load would build in each of them.
        others = [thread for thread in threads if thread is not builds[0]]
        deadline = time.monotonic() + 10
        while not all(waiting_in_acquire(thread) for thread in others):
            assert time.monotonic() < deadline and len(builds) == 1, f"the other requests do not wait for the load (builds: {len(builds)})"
            time.sleep(0.01)
        assert len(builds) == 1 and got == []  # waiting for the first load, not loading, not answered yet
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    assert len(builds) == 1 and len(got) == 3 and all(model is got[0] for model in got)
    assert (cache.loads, cache.hits) == (1, 2)


def test_cache_failed_build_propagates_and_is_not_cached():
    cache = ModelCache()

    def broken():
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        cache.acquire("x", broken)
    assert len(cache) == 0 and cache.loads == 0
    assert cache.acquire("x", lambda: Model("x")).name == "x"


def test_cache_memory_budget_evicts_least_recently_used():
    cache = ModelCache(max_models=10, memory_budget_bytes=250)
    a = cache.acquire("a", lambda: Model("a", 100))
    b = cache.acquire("b", lambda: Model("b", 100))
    cache.release(a)
    cache.release(b)
    cache.release(cache.acquire("a", lambda: Model("a", 100)))  # a is now the most recently used
    c = cache.acquire("c", lambda: Model("c", 100))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert b.closed and not a.closed and not c.closed
    assert cache.stats() == {"models_cached": 2, "models_loaded": 3, "model_cache_hits": 1, "models_evicted": 1}


def test_model_key_identifies_path_device_and_dtype(act_dir: Path):
    base = {"policy_path": str(act_dir), "device": "cpu"}
    assert model_key(base) == model_key({**base, "policy_path": str(act_dir) + "/.", "dtype": "float32"})
    assert model_key(base) != model_key({**base, "dtype": "bfloat16"})
    assert model_key(base) != model_key({**base, "device": "cuda"})


def test_loading_a_new_model_evicts_and_frees_an_idle_one(serve, act_dir, diffusion_dir):
    server = idle_server(serve, max_models=1)
    with PolicyClient(server.url) as a:
        a.configure(str(act_dir), device="cpu")
        act_policy = server.engine.sessions[next(iter(server.engine.sessions))].model.policy
    with PolicyClient(server.url) as b:
        b.configure(str(diffusion_dir), device="cpu")  # the load (on a worker thread) evicts the idle ACT
        assert b.infer(diffusion_obs()).shape == (8, 6)
        deadline = time.monotonic() + 10
        while act_policy.model is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert act_policy.model is None, "the evicted model's weights must be released"
    assert server.engine.models.evictions == 1 and server.engine.models.loads == 2


def test_serve_policy_path_model_is_in_the_cache(act_dir):
    """A client configuring the checkpoint `serve --policy.path` already serves shares it: no second copy."""
    checkpoint = act_dir
    port = free_port()
    process = subprocess.Popen([*POLICYLINK, "serve", "--host", "127.0.0.1", "--port", str(port), "--policy.path", str(checkpoint), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(port, process)
        with PolicyClient(f"ws://127.0.0.1:{port}", timeout=60) as client:
            metadata = client.configure(str(checkpoint), device="cpu")
            assert metadata.policy_type == "act"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            health = json.loads(response.read())
        assert (health["models_loaded"], health["model_cache_hits"], health["models_cached"]) == (0, 1, 1)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_served_checkpoint_announces_its_action_range_from_the_statistics(serve, act_dir):
    """min/max of the checkpoint's action statistics (the test checkpoints: mean 5 * joint, std 10, so mean - 20 .. mean + 20)."""
    pytest.importorskip("grpc")
    from protocol_servers import running

    from policylink.server.grpc_server import GrpcServer

    server = idle_server(serve)
    with PolicyClient(server.url) as client:
        metadata = client.configure(str(act_dir), device="cpu")
    expected_low = tuple(5.0 * joint - 20.0 for joint in range(6))
    np.testing.assert_allclose(metadata.action_low, expected_low)
    np.testing.assert_allclose(metadata.action_high, [5.0 * joint + 20.0 for joint in range(6)])
    engine = Engine(None, loader=load_from_request)
    rpc = GrpcServer(engine, "127.0.0.1", 0)
    with running(engine, [rpc]), PolicyClient(f"grpc://127.0.0.1:{rpc.port}") as client:
        np.testing.assert_allclose(client.configure(str(act_dir), device="cpu").action_low, expected_low)  # through the proto too
