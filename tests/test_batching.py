"""Batching requests across clients: same answers as alone, busy, disconnects, per-client state."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from conftest import run_concurrently, wait_until
from websockets.sync.client import connect

from policylink import PolicyClient, ServerBusy, ServerError
from policylink.codec import packb
from policylink.server.engine import BatchOptions, Engine
from policylink.types import Feature, Observation, Policy, PolicyMetadata, Reply

STATE_DIM, ACTION_DIM, HORIZON = 5, 3, 4


class LinearPolicy(Policy):
    """actions[t] = W_t @ state, computed for a whole batch with one einsum.

    Each client session counts its own calls (``reply["calls"]``) to show that
    per-client state stays per client. ``obs["sleep_s"]`` slows a batch down.
    ``batch_tags`` keeps each forward pass's ``obs["tag"]`` values. A batch with
    an ``obs["hold"]`` sets :attr:`holding` and waits for :attr:`release`.
    """

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.weights = rng.standard_normal((HORIZON, ACTION_DIM, STATE_DIM)).astype(np.float32)
        self._metadata = PolicyMetadata(
            action_dim=ACTION_DIM, horizon=HORIZON, input_features={"observation.state": Feature((STATE_DIM,))}, model_id="test/linear"
        )
        self.calls = 0
        self.batches: list[int] = []
        self.seen_tags: list[float] = []
        self.batch_tags: list[list[float]] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    @property
    def metadata(self) -> PolicyMetadata:
        return self._metadata

    def session(self) -> LinearPolicy:
        clone = object.__new__(LinearPolicy)
        clone.__dict__.update(self.__dict__)
        clone.calls = 0
        return clone

    def batch_key(self, obs: Observation):
        return np.shape(obs["observation.state"])

    def infer(self, obs: Observation) -> Reply:
        return self.infer_batch([self], [obs])[0]

    def infer_batch(self, sessions: Sequence[Policy], observations: Sequence[Observation]) -> list[Reply]:
        self.batches.append(len(observations))
        tags = [float(obs.get("tag", -1)) for obs in observations]
        self.seen_tags.extend(tags)
        self.batch_tags.append(tags)
        if any("hold" in obs for obs in observations):
            self.holding.set()
            assert self.release.wait(30), "the test never released the held batch"
        time.sleep(max(float(obs.get("sleep_s", 0.0)) for obs in observations))
        states = np.stack([np.asarray(obs["observation.state"], np.float32) for obs in observations])
        actions = np.einsum("tas,bs->bta", self.weights, states)
        replies = []
        for session, chunk in zip(sessions, actions):
            session.calls += 1
            replies.append({"actions": chunk, "calls": session.calls})
        return replies


def alone(policy: LinearPolicy, state: np.ndarray) -> np.ndarray:
    return np.einsum("tas,s->ta", policy.weights, state).astype(np.float32)


def test_concurrent_clients_get_the_actions_they_would_get_alone(serve):
    policy = LinearPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=8, batch_timeout_ms=300)))
    states = np.random.default_rng(1).standard_normal((8, STATE_DIM)).astype(np.float32)
    clients = [PolicyClient(server.url) for _ in range(8)]
    try:
        chunks = run_concurrently(8, lambda i: clients[i].infer({"observation.state": states[i]}))
    finally:
        for client in clients:
            client.close()
    for i, chunk in enumerate(chunks):
        assert not isinstance(chunk, Exception), chunk
        np.testing.assert_allclose(chunk, alone(policy, states[i]), rtol=1e-6, atol=1e-6)
        assert chunk.server_timing["batch_size"] >= 1
        assert {"queue_ms", "infer_ms", "decode_ms"} <= set(chunk.server_timing)
    assert max(policy.batches) > 1, f"no batch formed: {policy.batches}"
    assert sum(policy.batches) == 8
    assert max(chunk.server_timing["batch_size"] for chunk in chunks) == max(policy.batches)


def test_requests_of_different_shapes_do_not_share_a_batch(serve):
    policy = LinearPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=8, batch_timeout_ms=200)))
    good = np.ones(STATE_DIM, np.float32)
    clients = [PolicyClient(server.url) for _ in range(4)]

    def work(i: int):
        state = good if i % 2 == 0 else np.ones(STATE_DIM + 1, np.float32)
        return clients[i].infer({"observation.state": state, "tag": float(i)})

    try:
        results = run_concurrently(4, work)
    finally:
        for client in clients:
            client.close()
    for i in (0, 2):
        np.testing.assert_allclose(results[i], alone(policy, good), rtol=1e-6)
    for i in (1, 3):  # the wrong-shaped ones fail on their own, the others are unharmed
        assert isinstance(results[i], ServerError), results[i]
        assert "inference failed: ValueError" in str(results[i])
    # No forward pass mixed the shapes: each batch holds right-shaped (even tags) or wrong-shaped (odd tags) requests only.
    right, wrong = {0.0, 2.0}, {1.0, 3.0}
    assert all(set(tags) <= right or set(tags) <= wrong for tags in policy.batch_tags), policy.batch_tags
    assert right <= set(policy.seen_tags) and wrong <= set(policy.seen_tags), policy.batch_tags


def test_per_client_state_never_leaks_across_batched_clients(serve):
    policy = LinearPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=4, batch_timeout_ms=100)))
    clients = [PolicyClient(server.url) for _ in range(4)]
    state = np.zeros(STATE_DIM, np.float32)
    try:
        for round_ in range(1, 4):
            results = run_concurrently(4, lambda i: clients[i].infer({"observation.state": state}))
            assert [chunk["calls"] for chunk in results] == [round_] * 4
    finally:
        for client in clients:
            client.close()


def test_full_queue_answers_server_busy_and_recovers(serve):
    policy = LinearPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=1, max_queue=2)))
    clients = [PolicyClient(server.url, timeout=30) for _ in range(5)]
    obs = {"observation.state": np.zeros(STATE_DIM, np.float32), "sleep_s": 0.5}
    try:
        results = run_concurrently(5, lambda i: clients[i].infer(obs))
        busy = [r for r in results if isinstance(r, ServerBusy)]
        served = [r for r in results if isinstance(r, np.ndarray)]
        assert busy and served, results
        assert len(busy) + len(served) == 5
        assert "server busy" in str(busy[0]) and "limit 2" in str(busy[0])
        # Once the queue drained, everyone is served again.
        assert clients[0].infer({"observation.state": np.zeros(STATE_DIM, np.float32)}).shape == (HORIZON, ACTION_DIM)
    finally:
        for client in clients:
            client.close()


def test_client_that_disconnects_while_queued_is_dropped(serve):
    policy = LinearPolicy()
    engine = Engine(policy, batching=BatchOptions(max_batch=4, batch_timeout_ms=0))
    server = serve(engine)
    scheduler = engine.default_model.scheduler
    state = np.zeros(STATE_DIM, np.float32)
    with PolicyClient(server.url, timeout=30) as slow:
        thread = threading.Thread(target=lambda: slow.infer({"observation.state": state, "hold": True, "tag": 1.0}))
        thread.start()
        try:
            assert policy.holding.wait(10), "the slow batch never started"
            with connect(server.url) as ws:
                ws.recv(timeout=5)
                ws.send(packb({"observation.state": state, "tag": 99.0}))
                wait_until(lambda: scheduler.queued == 1, "the second request to queue behind the slow batch")
            # The server noticed the disconnect (and cancelled the queued request) once it closed that session.
            wait_until(lambda: len(engine.sessions) == 1, "the server to close the disconnected session")
            assert policy.seen_tags == [1.0]  # the slow batch still holds the worker: nothing else ran yet
        finally:
            policy.release.set()
        thread.join(30)
    assert not thread.is_alive()
    with PolicyClient(server.url) as after:
        after.infer({"observation.state": state, "tag": 2.0})
    assert 99.0 not in policy.seen_tags
    assert policy.seen_tags == [1.0, 2.0]


def test_batching_off_runs_one_at_a_time(serve):
    policy = LinearPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=1)))
    clients = [PolicyClient(server.url) for _ in range(4)]
    try:
        results = run_concurrently(4, lambda i: clients[i].infer({"observation.state": np.ones(STATE_DIM, np.float32)}))
    finally:
        for client in clients:
            client.close()
    assert all(isinstance(r, np.ndarray) for r in results)
    assert policy.batches == [1, 1, 1, 1]


class PreparingPolicy(LinearPolicy):
    """A :class:`LinearPolicy` with a preparation step: it records the thread it ran on and when.

    ``prepared`` is set whenever a request with ``obs["tag"] == 2`` has been prepared; an
    ``obs["bad"]`` fails in preparation (as a bad prompt or image would).
    """

    def __init__(self) -> None:
        super().__init__()
        self.prepare_threads: list[str] = []
        self.prepared = threading.Event()

    def prepare(self, session: Policy, obs: Observation) -> Observation:
        self.prepare_threads.append(threading.current_thread().name)
        if "bad" in obs:
            raise ValueError("this observation cannot be prepared")
        prepared = dict(obs)
        prepared["observation.state"] = np.asarray(obs["observation.state"], np.float32) * 1.0
        if obs.get("tag") == 2.0:
            self.prepared.set()
        return prepared


def test_requests_are_prepared_while_the_batch_before_runs(serve):
    policy = PreparingPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=4, batch_timeout_ms=0)))
    state = np.arange(STATE_DIM, dtype=np.float32)
    with PolicyClient(server.url, timeout=30) as first, PolicyClient(server.url, timeout=30) as second:
        held = threading.Thread(target=lambda: first.infer({"observation.state": state, "hold": True, "tag": 1.0}))
        held.start()
        try:
            assert policy.holding.wait(10), "the first batch never started"
            results: list = []
            later = threading.Thread(target=lambda: results.append(second.infer({"observation.state": state, "tag": 2.0})))
            later.start()
            # The model is still busy with the held batch, yet the next request gets prepared.
            assert policy.prepared.wait(10), "the second request was not prepared while the first batch ran"
            assert policy.seen_tags == [1.0]
        finally:
            policy.release.set()
        held.join(30)
        later.join(30)
    assert all(name.startswith("prepare-") for name in policy.prepare_threads), policy.prepare_threads
    np.testing.assert_allclose(results[0], alone(policy, state), rtol=1e-6)
    assert results[0].server_timing["prepare_ms"] >= 0
    assert policy.seen_tags == [1.0, 2.0]


def test_without_overlap_preparation_runs_in_the_batch_on_the_model_thread(serve):
    policy = PreparingPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=4, batch_timeout_ms=0, overlap=False)))
    with PolicyClient(server.url) as client:
        reply = client.infer({"observation.state": np.ones(STATE_DIM, np.float32)})
    assert [name.split("-")[0] for name in policy.prepare_threads] == ["infer"]
    assert "prepare_ms" not in reply.server_timing
    assert engine_overlaps(server) is False


def engine_overlaps(server) -> bool:
    return server.engine.default_model.scheduler.overlaps


def test_a_request_that_fails_preparation_fails_alone(serve):
    policy = PreparingPolicy()
    server = serve(Engine(policy, batching=BatchOptions(max_batch=4, batch_timeout_ms=300)))
    states = np.random.default_rng(2).standard_normal((4, STATE_DIM)).astype(np.float32)
    clients = [PolicyClient(server.url) for _ in range(4)]

    def work(i: int):
        obs = {"observation.state": states[i], "tag": float(i)}
        if i == 1:
            obs["bad"] = True
        return clients[i].infer(obs)

    try:
        results = run_concurrently(4, work)
    finally:
        for client in clients:
            client.close()
    assert isinstance(results[1], ServerError) and "cannot be prepared" in str(results[1]), results[1]
    for i in (0, 2, 3):
        np.testing.assert_allclose(results[i], alone(policy, states[i]), rtol=1e-6)
    assert 1.0 not in policy.seen_tags
    assert engine_overlaps(server) is True


@pytest.mark.parametrize("bad", [{"max_batch": 0}])
def test_bad_batch_options_are_refused(bad):
    from policylink.server.batching import BatchScheduler

    with pytest.raises(ValueError, match="max_batch"):
        BatchScheduler(LinearPolicy(), None, **bad)
