"""Real-time chunking on the server: fields checked on the one request path, guidance through LeRobot's RTC code.

Real servers on 127.0.0.1, real clients: the built-in ``flow`` policy and a
SmolVLA checkpoint (random weights) saved with LeRobot's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("lerobot")

from conftest import run_concurrently  # noqa: E402
from lerobot_checkpoints import smolvla_dir  # noqa: E402,F401
from policylink import PolicyClient  # noqa: E402
from policylink.errors import RequestError  # noqa: E402
from policylink.policies.builtin import make_builtin_policy  # noqa: E402
from policylink.rtc import RTC_KEY, SEED_KEY, RTCRequest  # noqa: E402
from policylink.server.background import BackgroundServer  # noqa: E402
from policylink.server.engine import BatchOptions, Engine  # noqa: E402

HORIZON = 16


@pytest.fixture(scope="module")
def flow_server() -> Iterator[BackgroundServer]:
    server = BackgroundServer(Engine(make_builtin_policy("flow", action_dim=6, horizon=HORIZON)), host="127.0.0.1").start()
    yield server
    server.stop()


def rtc(prefix: np.ndarray, delay: int, horizon: int, **extra) -> dict:
    return {RTC_KEY: {"prefix": np.asarray(prefix, np.float32), "delay": delay, "execution_horizon": horizon, **extra}}


def gap(chunk: np.ndarray, prefix: np.ndarray, steps: int) -> float:
    return float(np.abs(chunk[:steps] - prefix[:steps]).mean())


def test_flow_metadata_announces_rtc_and_others_do_not(flow_server, serve):
    with PolicyClient(flow_server.url) as client:
        support = client.metadata.rtc
    assert support is not None and support.schedule == "linear" and support.execution_horizon == 10 and support.guidance == 10.0
    plain = serve(Engine(make_builtin_policy("random")))
    with PolicyClient(plain.url) as client:
        assert client.metadata.rtc is None


def test_same_seed_same_chunk_and_guidance_pulls_the_prefix_to_the_remainder(flow_server):
    with PolicyClient(flow_server.url) as client:
        previous = np.asarray(client.infer({"step": 0, SEED_KEY: 7}))
        remainder = previous[6:]  # what is still queued at step 6
        free = np.asarray(client.infer({"step": 6, SEED_KEY: 8}))
        again = np.asarray(client.infer({"step": 6, SEED_KEY: 8}))
        guided = np.asarray(client.infer({"step": 6, SEED_KEY: 8, **rtc(remainder, delay=3, horizon=8)}))
    np.testing.assert_array_equal(free, again)
    assert gap(guided, remainder, 3) < 0.1 * gap(free, remainder, 3), "the first `delay` steps must follow the remainder"
    assert gap(guided, remainder, 8) < gap(free, remainder, 8)
    assert np.abs(guided[12:] - free[12:]).max() < np.abs(guided[:3] - free[:3]).max(), "guidance acts on the prefix, not the tail"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (rtc(np.zeros((8, 5)), 2, 4), r"__rtc__.prefix' has 5 values per step; the policy's actions have 6"),
        (rtc(np.zeros((8, 6)), -1, 4), r"__rtc__.delay' must be a whole number >= 0"),
        (rtc(np.zeros((8, 6)), 5, 4), r"delay' \(5\) is past the execution horizon \(4\)"),
        (rtc(np.zeros((8, 6)), 2, HORIZON + 1), r"execution_horizon' \(17\) is past the policy's chunk length \(16\)"),
        (rtc(np.zeros((HORIZON + 4, 6)), 2, 4), r"prefix' has 20 steps; the policy's chunk has only 16"),
        (rtc(np.zeros((2, 6)), 3, 4), r"delay' \(3\) is longer than the prefix \(2 steps\)"),
        (rtc(np.full((8, 6), np.nan), 2, 4), r"prefix' holds non-finite values"),
        (rtc(np.zeros((8, 6)), 2, 4, guidance=500.0), r"guidance' \(500\) is above this server's limit \(50\)"),
        (rtc(np.zeros((8, 6)), 2, 4, schedule="cubic"), r"schedule' must be one of"),
        ({RTC_KEY: {"prefix": np.zeros((8, 6), np.float32), "execution_horizon": 4}}, r"'__rtc__' needs 'delay'"),
        ({RTC_KEY: {"prefix": np.zeros((14, 6), np.float32), "delay": 12}}, r"delay' \(12\) is past the server's default execution horizon \(10\)"),
        ({RTC_KEY: [1, 2, 3]}, r"'__rtc__' must be a map"),
        ({SEED_KEY: -3}, r"'__seed__' must be a whole number"),
    ],
)
def test_bad_rtc_fields_get_named_errors_and_the_server_goes_on(flow_server, fields, message):
    with PolicyClient(flow_server.url) as client:
        with pytest.raises(RequestError, match=message):
            client.infer({"step": 0, **fields})
        assert np.asarray(client.infer({"step": 0})).shape == (HORIZON, 6)


def test_the_execution_horizon_defaults_to_the_servers(flow_server):
    with PolicyClient(flow_server.url) as client:
        previous = np.asarray(client.infer({"step": 0, SEED_KEY: 1}))
        default = np.asarray(client.infer({"step": 2, SEED_KEY: 2, RTC_KEY: {"prefix": previous[2:], "delay": 2}}))
        explicit = np.asarray(client.infer({"step": 2, SEED_KEY: 2, **rtc(previous[2:], 2, 10)}))
        shorter = np.asarray(client.infer({"step": 2, SEED_KEY: 2, **rtc(previous[2:], 2, 3)}))
    np.testing.assert_array_equal(default, explicit)
    assert not np.array_equal(default, shorter)


def test_a_policy_that_cannot_steer_ignores_the_fields(serve):
    server = serve(Engine(make_builtin_policy("replay", horizon=HORIZON)))
    with PolicyClient(server.url) as client:
        plain = np.asarray(client.infer({"step": 4}))
        with_rtc = np.asarray(client.infer({"step": 4, **rtc(np.ones((4, 6)), 1, 2)}))
    np.testing.assert_array_equal(plain, with_rtc)


def batched_versus_alone(url_batched: str, url_alone: str, requests: list[dict]) -> tuple[list, list]:
    clients = [PolicyClient(url_batched) for _ in requests]
    try:
        batched = run_concurrently(len(requests), lambda i: clients[i].infer(requests[i]))
    finally:
        for client in clients:
            client.close()
    with PolicyClient(url_alone) as client:
        alone = [np.asarray(client.infer(request)) for request in requests]
    return batched, alone


def test_flow_batches_clients_with_their_own_remainders_and_delays(serve):
    policy = make_builtin_policy("flow", action_dim=6, horizon=HORIZON)
    batched_server = serve(Engine(policy, batching=BatchOptions(max_batch=4, batch_timeout_ms=5000)))
    alone_server = serve(Engine(policy, batching=BatchOptions(max_batch=1)))
    base = policy.sample([0], [None], [1])[0]
    requests = [
        {"step": 8, SEED_KEY: 11, **rtc(base[8:], 2, 6)},
        {"step": 5, SEED_KEY: 12, **rtc(base[5:9], 4, 4, guidance=3.0, schedule="exp")},
        {"step": 3, SEED_KEY: 13},
        {"step": 9, SEED_KEY: 14, **rtc(base[9:], 0, 7)},
    ]
    batched, alone = batched_versus_alone(batched_server.url, alone_server.url, requests)
    for chunk, expected in zip(batched, alone):
        assert not isinstance(chunk, Exception), chunk
        assert chunk.server_timing["batch_size"] == 4
        np.testing.assert_allclose(np.asarray(chunk), expected, rtol=1e-5, atol=1e-6)


# -- SmolVLA: LeRobot's RTC on a served VLA ------------------------------------------------------


def smolvla_observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation.state": rng.normal(size=6).astype(np.float32),
            "observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "task": "pick the red cube"}


@pytest.fixture
def smolvla_policy(smolvla_dir: Path):
    """Loaded per test: stopping a server closes its engine's policy."""
    pytest.importorskip("transformers")
    from policylink.backends.lerobot import load_policy

    return load_policy(smolvla_dir, device="cpu")


def test_guidance_pulls_a_served_smolvla_toward_the_sent_remainder(serve, smolvla_policy):
    server = serve(Engine(smolvla_policy))
    obs = smolvla_observation(1)
    with PolicyClient(server.url) as client:
        assert client.metadata.rtc is not None and client.metadata.rtc.execution_horizon == 8
        free = np.asarray(client.infer({**obs, SEED_KEY: 5}))
        again = np.asarray(client.infer({**obs, SEED_KEY: 5}))
        # A remainder far from what the policy would do on its own, in the policy's (un-normalised) action space.
        remainder = free[:6] + np.linspace(5.0, 8.0, 6)[:, None].astype(np.float32)
        guided = np.asarray(client.infer({**obs, SEED_KEY: 5, **rtc(remainder, delay=2, horizon=5)}))
        with pytest.raises(RequestError, match="has 4 values per step; the policy's actions have 6"):
            client.infer({**obs, **rtc(np.zeros((4, 4)), 1, 2)})
    np.testing.assert_allclose(free, again, atol=1e-5)
    assert gap(guided, remainder, 2) < 0.5 * gap(free, remainder, 2), (gap(guided, remainder, 2), gap(free, remainder, 2))
    assert np.isfinite(guided).all()


def test_smolvla_batches_with_rtc_and_each_client_gets_what_it_would_alone(serve, smolvla_policy):
    batched_server = serve(Engine(smolvla_policy, batching=BatchOptions(max_batch=3, batch_timeout_ms=5000)))
    alone_server = serve(Engine(smolvla_policy, batching=BatchOptions(max_batch=1)))
    remainder = np.linspace(-3.0, 3.0, 6 * 6, dtype=np.float32).reshape(6, 6)
    requests = [
        {**smolvla_observation(2), SEED_KEY: 21, **rtc(remainder, 2, 5)},
        {**smolvla_observation(3), SEED_KEY: 22, **rtc(remainder[:3] * 2, 1, 3)},
        {**smolvla_observation(4), SEED_KEY: 23, "task": "stack the blue cubes"},
    ]
    batched, alone = batched_versus_alone(batched_server.url, alone_server.url, requests)
    for chunk, expected in zip(batched, alone):
        assert not isinstance(chunk, Exception), chunk
        assert chunk.server_timing["batch_size"] == 3
        np.testing.assert_allclose(np.asarray(chunk), expected, rtol=1e-4, atol=1e-4)


def test_rtc_request_round_trips_its_wire_form():
    request = RTCRequest(np.arange(12, dtype=np.float32).reshape(4, 3), delay=1, execution_horizon=3, guidance=2.5, schedule="exp")
    again = RTCRequest.from_wire(request.to_wire())
    np.testing.assert_array_equal(again.prefix, request.prefix)
    assert (again.delay, again.execution_horizon, again.guidance, again.schedule) == (1, 3, 2.5, "exp")


def test_rtc_fields_over_length_prefixed_tcp():
    from protocol_servers import running

    from policylink.client.tcp import TcpClient
    from policylink.server.tcp import TcpServer

    engine = Engine(make_builtin_policy("flow", action_dim=6, horizon=HORIZON))
    server = TcpServer(engine, "127.0.0.1", 0, max_frame_bytes=1 << 20)
    with running(engine, [server]), TcpClient("127.0.0.1", server.port) as client:
        assert client.metadata["rtc"]["execution_horizon"] == 10
        previous = client.request({"step": 0, SEED_KEY: 3})["actions"]
        free = client.request({"step": 4, SEED_KEY: 4})["actions"]
        guided = client.request({"step": 4, SEED_KEY: 4, **rtc(previous[4:], 2, 6)})["actions"]
        assert gap(guided, previous[4:], 2) < 0.1 * gap(free, previous[4:], 2)
        with pytest.raises(RequestError, match=r"delay' \(7\) is past the execution horizon \(6\)"):
            client.request({"step": 4, **rtc(previous[4:], 7, 6)})
        assert client.request({"step": 5})["actions"].shape == (HORIZON, 6)


def test_serve_flags_set_the_flow_policys_rtc_defaults_or_turn_them_off(serve):
    from policylink.cli import build_parser
    from policylink.cli.serve import builtin_from_args

    tuned = builtin_from_args(build_parser().parse_args(
        ["serve", "--policy.type", "flow", "--policy.horizon", "8", "--policy.rtc_schedule", "exp", "--policy.rtc_guidance", "4"]))
    assert (tuned.metadata.rtc.schedule, tuned.metadata.rtc.guidance, tuned.metadata.rtc.execution_horizon) == ("exp", 4.0, 8)
    off = builtin_from_args(build_parser().parse_args(["serve", "--policy.type", "flow", "--policy.horizon", "8", "--policy.no_rtc"]))
    assert off.metadata.rtc is None
    server = serve(Engine(off))
    with PolicyClient(server.url) as client:
        plain = np.asarray(client.infer({"step": 0, SEED_KEY: 1}))
        ignored = np.asarray(client.infer({"step": 0, SEED_KEY: 1, **rtc(plain + 0.5, 3, 6)}))
    np.testing.assert_array_equal(plain, ignored)
