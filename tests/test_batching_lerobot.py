"""Batching LeRobot policies across clients: each client gets exactly what it would get alone.

Real servers on 127.0.0.1, real clients: a batching server (``max_batch`` = the number of
clients, a long timeout so concurrent requests form one batch) beside a server that runs
every request alone (``max_batch=1``), both serving the same loaded checkpoint (random
weights, saved with LeRobot's code). Diffusion reads a per-client observation history: its
clients' histories are stacked into the batch, and each row samples from its own seed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("lerobot")

from conftest import run_concurrently  # noqa: E402
from lerobot_checkpoints import act_dir, diffusion_dir  # noqa: E402,F401
from policylink import PolicyClient  # noqa: E402
from policylink.rtc import SEED_KEY  # noqa: E402
from policylink.server.engine import BatchOptions, Engine  # noqa: E402

#: Rows of one batched forward pass against the same requests run alone: float32 on CPU, where only the
#: summation order of the batched kernels differs (measured up to ~2.5e-5 on un-normalised actions of size ~45).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def diffusion_obs(client: int, step: int, seed: int | None) -> dict:
    rng = np.random.default_rng(1000 * client + step)
    obs = {"observation.state": rng.normal(size=6).astype(np.float32),
           "observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    if seed is not None:
        obs[SEED_KEY] = seed
    return obs


def act_obs(client: int, step: int) -> dict:
    rng = np.random.default_rng(2000 * client + step)
    return {"observation.state": rng.normal(size=6).astype(np.float32),
            "observation.images.front": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)}


@pytest.fixture
def load() -> Callable[[Path], object]:
    """Loaded per test: stopping a server closes its engine's policy."""
    from policylink.backends.lerobot import load_policy

    return lambda directory: load_policy(directory, device="cpu")


def servers(serve, policy, clients: int):
    batched = serve(Engine(policy, batching=BatchOptions(max_batch=clients, batch_timeout_ms=5000)))
    alone = serve(Engine(policy, batching=BatchOptions(max_batch=1)))
    return batched, alone


def batched_round(clients: list[PolicyClient], requests: list[dict]) -> list[np.ndarray]:
    """One request per client, sent together; asserts they ran as one batch."""
    replies = run_concurrently(len(clients), lambda i: clients[i].infer(requests[i]))
    for reply in replies:
        assert not isinstance(reply, Exception), reply
        assert reply.server_timing["batch_size"] == len(clients)
        assert reply.server_timing["prepare_ms"] > 0  # prepared on the preparation thread, before the batch ran
    return [np.asarray(reply) for reply in replies]


def lone_round(clients: list[PolicyClient], requests: list[dict]) -> list[np.ndarray]:
    replies = [client.infer(request) for client, request in zip(clients, requests)]
    assert all(reply.server_timing["batch_size"] == 1 for reply in replies)
    return [np.asarray(reply) for reply in replies]


def assert_same(got: list[np.ndarray], expected: list[np.ndarray], rows: range | None = None) -> None:
    for index in rows if rows is not None else range(len(expected)):
        np.testing.assert_allclose(got[index], expected[index], **TOLERANCE, err_msg=f"client {index}")


def connect(url: str, count: int) -> list[PolicyClient]:
    return [PolicyClient(url) for _ in range(count)]


def close(*groups: list[PolicyClient]) -> None:
    for group in groups:
        for client in group:
            client.close()


def test_diffusion_batches_clients_with_their_own_histories_and_seeds(serve, load, diffusion_dir):
    policy = load(diffusion_dir)
    assert policy.batch_key(diffusion_obs(0, 0, 1)) is not None
    batched, alone = servers(serve, policy, 4)
    # Three seeded clients and one that draws fresh noise (only the seeded rows can be compared).
    seeds = [[11, 12, 13, None], [21, 22, 23, None], [31, 32, 33, None]]
    rounds = [[diffusion_obs(i, step, seeds[step][i]) for i in range(4)] for step in range(3)]
    together, apart, fresh = connect(batched.url, 4), connect(alone.url, 4), connect(alone.url, 3)
    try:
        got = [batched_round(together, rounds[0]), batched_round(together, rounds[1])]
        # Then lone requests on the batching server: the history a batch left behind gives the next chunk.
        got.append(lone_round(together, rounds[2]))
        expected = [lone_round(apart, requests) for requests in rounds]
        # The same second observation and seed without the first in its history gives another chunk.
        no_history = lone_round(fresh, rounds[1][:3])
    finally:
        close(together, apart, fresh)
    for step in range(3):
        assert_same(got[step], expected[step], range(3))
        assert all(chunk.shape == (8, 6) and np.isfinite(chunk).all() for chunk in got[step])
    for index in range(3):
        assert np.abs(got[1][index] - no_history[index]).max() > 1e-3, "the batch must read each client's history"
    assert len({chunk.tobytes() for chunk in got[1]}) == 4, "every client gets its own row"


def test_diffusion_reset_clears_only_that_clients_history_while_batched(serve, load, diffusion_dir):
    batched, alone = servers(serve, load(diffusion_dir), 3)
    rounds = [[diffusion_obs(i, step, 40 + 10 * step + i) for i in range(3)] for step in range(3)]
    together, apart, fresh = connect(batched.url, 3), connect(alone.url, 3), connect(alone.url, 3)
    try:
        batched_round(together, rounds[0])
        batched_round(together, rounds[1])
        together[0].reset()
        got = batched_round(together, rounds[2])
        lone_round(apart, rounds[0])
        lone_round(apart, rounds[1])
        apart[0].reset()
        expected = lone_round(apart, rounds[2])
        first_request, *others_fresh = lone_round(fresh, rounds[2])
    finally:
        close(together, apart, fresh)
    assert_same(got, expected)
    # The reset client starts over: its chunk is a new client's first; the others kept their histories.
    np.testing.assert_allclose(got[0], first_request, **TOLERANCE)
    for index, new_client in zip((1, 2), others_fresh):
        assert np.abs(got[index] - new_client).max() > 1e-3


def test_act_batches_clients_and_each_gets_what_it_would_alone(serve, load, act_dir):
    batched, alone = servers(serve, load(act_dir), 3)
    rounds = [[act_obs(i, step) for i in range(3)] for step in range(2)]
    together, apart = connect(batched.url, 3), connect(alone.url, 3)
    try:
        got = [batched_round(together, requests) for requests in rounds]
        expected = [lone_round(apart, requests) for requests in rounds]
    finally:
        close(together, apart)
    for step in range(2):
        assert_same(got[step], expected[step])
        assert len({chunk.tobytes() for chunk in got[step]}) == 3


def test_a_failed_diffusion_batch_appends_nothing_to_the_histories(load, diffusion_dir, monkeypatch):
    """A batch that fails in the model leaves every client's history as it was (the scheduler then retries one by one)."""
    policy = load(diffusion_dir)
    sessions = [policy.session() for _ in range(3)]
    first = [diffusion_obs(i, 0, 50 + i) for i in range(3)]
    second = [diffusion_obs(i, 1, 60 + i) for i in range(3)]
    policy.infer_batch(sessions, first)
    before = [{key: [id(item) for item in queue] for key, queue in session._state["queues"].items()} for session in sessions]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(policy.model.diffusion, "conditional_sample", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        policy.infer_batch(sessions, second)
    monkeypatch.undo()
    for session, history in zip(sessions, before):
        assert {key: [id(item) for item in queue] for key, queue in session._state["queues"].items()} == history
    # Retried one by one, each request gets what it would have got in the batch.
    retried = [session.infer(obs)["actions"] for session, obs in zip(sessions, second)]
    reference = [policy.session() for _ in range(3)]
    policy.infer_batch(reference, first)
    expected = policy.infer_batch(reference, second)
    for chunk, want in zip(retried, expected):
        np.testing.assert_allclose(chunk, want["actions"], **TOLERANCE)


def test_a_compiled_act_batches_and_answers_as_the_eager_one(serve, load, act_dir):
    """``--compile``: torch.compile'd network, warmed up for one and for more rows, same actions as eager within tolerance."""
    import torch

    from policylink.backends.lerobot import load_policy

    compiled = load_policy(act_dir, device="cpu", compile="default")
    assert compiled.compiled == "default"
    assert isinstance(compiled.model.model, torch._dynamo.eval_frame.OptimizedModule)
    batched = serve(Engine(compiled, batching=BatchOptions(max_batch=3, batch_timeout_ms=5000)))
    eager = serve(Engine(load(act_dir), batching=BatchOptions(max_batch=1)))
    rounds = [[act_obs(i, step) for i in range(3)] for step in range(2)]
    together, apart = connect(batched.url, 3), connect(eager.url, 3)
    try:
        got = [batched_round(together, requests) for requests in rounds]
        got.append(lone_round(together[:1], rounds[0][:1]))  # and a batch of one
        expected = [lone_round(apart, requests) for requests in rounds]
    finally:
        close(together, apart)
    for step in range(2):
        assert_same(got[step], expected[step])
    assert_same(got[2], expected[0][:1])


def test_compile_modes_and_policies_are_checked(act_dir):
    from policylink.backends.lerobot import load_policy
    from policylink.errors import RequestError

    with pytest.raises(RequestError, match="unknown compile mode 'fast'"):
        load_policy(act_dir, device="cpu", compile="fast")
