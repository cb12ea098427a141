"""Real-time chunking on the client: the executor's ``merge="rtc"``.

What a request carries (the queued remainder, the delay, the horizon), the
exact splice when the chunk arrives, the fallback against servers that
cannot do it, and the smoothness it buys against a real server with the
built-in flow-matching policy. Simulated time (:class:`SteppedClock`): every
number is exact and nothing waits on the wall clock.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest

from policylink.cli import main
from policylink.client import PolicyClient
from policylink.envs.fake import FakeEnv
from policylink.evaluation.rollout import ExecutionConfig, run_episode
from policylink.policies.builtin import ReplayPolicy, make_builtin_policy
from policylink.rtc import RTC_KEY, RTCSupport
from policylink.runtime.clock import RealTimeClock, SteppedClock
from policylink.runtime.events import ChunkEvent, StepEvent
from policylink.runtime.executor import RTC_UNSUPPORTED, Executor, ExecutorConfig
from policylink.runtime.merging import MERGE_RULES, RTCSplice, make_merge_rule
from policylink.runtime.stats import LatencyEstimator
from policylink.types import PolicyMetadata

ACTION_DIM = 6
HORIZON = 16
CAMERAS = {"front": (24, 32)}


class ChunkPolicy:
    """Chunk ``k`` (counted from 1) holds ``k + 0.01 * i + 0.001 * j`` at step ``i``, joint ``j``: every value tells where it came from.

    Announces real-time-chunking support (or not) in its metadata, and keeps
    what each request carried.
    """

    def __init__(self, rtc: bool = True) -> None:
        self.metadata = PolicyMetadata(action_dim=ACTION_DIM, horizon=HORIZON, rtc=RTCSupport() if rtc else None)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def infer(self, obs: dict[str, Any]) -> np.ndarray:
        with self._lock:
            self.requests.append({"step": int(obs["step"]), "rtc": obs.get(RTC_KEY)})
            k = len(self.requests)
        steps = np.arange(HORIZON, dtype=np.float64)[:, None]
        joints = np.arange(ACTION_DIM, dtype=np.float64)[None, :]
        return (0.1 * k + 0.01 * steps + 0.001 * joints).astype(np.float32)


class Events:
    """Keeps the executor's step and chunk events."""

    def __init__(self) -> None:
        self.steps: list[StepEvent] = []
        self.chunks: list[ChunkEvent] = []

    def on_step(self, event: StepEvent) -> None:
        self.steps.append(event)

    def on_chunk(self, event: ChunkEvent) -> None:
        self.chunks.append(event)


def fake_env(steps: int) -> FakeEnv:
    return FakeEnv("single", image_size=CAMERAS["front"], episode_steps=steps)


def rtc_config(**options: Any) -> ExecutorConfig:
    # resume_max_delta=1e6: no resume ramp at the episode's start, so every command is exactly its action.
    return ExecutorConfig(mode="async", merge="rtc", resume_max_delta=1e6, **options)


def run_rtc(policy: Any, latency: int = 3, steps: int = 60, episodes: int = 1, **options: Any) -> tuple[Executor, Events]:
    events = Events()
    executor = Executor(policy, fake_env(steps), rtc_config(**options), clock=SteppedClock(30, latency), listeners=[events])
    try:
        executor.run(episodes=episodes)
    finally:
        executor.close()
    return executor, events


def test_the_new_chunk_is_spliced_in_exactly_at_the_elapsed_index():
    latency, n = 3, 10
    policy = ChunkPolicy()
    executor, events = run_rtc(policy, latency=latency, steps=80, n_action_steps=n)
    assert executor.status()["merge"] == "rtc"
    assert executor.stats.stalls == 0 and executor.stats.rejected_chunks == 0
    chunks = {chunk.chunk_id: chunk for chunk in events.chunks}
    assert len(chunks) >= 6
    executed = [event for event in events.steps if event.fresh]
    assert len(executed) == 80
    # Every executed action is its chunk's entry for that step: nothing blended, nothing shifted.
    for event in executed:
        chunk = chunks[event.chunk_id]
        assert np.array_equal(event.action, chunk.actions[event.step - chunk.obs_step])
    joins = [i for i in range(1, len(executed)) if executed[i].chunk_id != executed[i - 1].chunk_id]
    assert len(joins) == len(chunks) - 1
    for i in joins:
        old, new = chunks[executed[i - 1].chunk_id], chunks[executed[i].chunk_id]
        elapsed = executed[i].step - new.obs_step
        assert elapsed == latency
        # The old chunk ran for the elapsed steps (from the step the new one was asked at) ...
        before = np.stack([event.action for event in executed[i - elapsed:i]])
        assert np.array_equal(before, old.actions[new.obs_step - old.obs_step:new.obs_step - old.obs_step + elapsed])
        # ... then the new chunk continues from index `elapsed`, to the end of its n_action_steps.
        after = [event for event in executed[i:] if event.chunk_id == new.chunk_id]
        assert np.array_equal(np.stack([event.action for event in after]), new.actions[elapsed:elapsed + len(after)])
    # The boundary jump is between the last old action executed and the new chunk's entry at the splice.
    expected_jumps = [float(np.max(np.abs(executed[i].action - executed[i - 1].action))) for i in joins]
    np.testing.assert_allclose(list(executor.stats.boundary_jumps), expected_jumps, rtol=1e-6)


def test_each_request_carries_the_queued_remainder_and_the_delay():
    latency, n = 3, 10
    policy = ChunkPolicy()
    _, events = run_rtc(policy, latency=latency, steps=50, episodes=2, n_action_steps=n)
    assert len(policy.requests) == len(events.chunks) >= 8
    firsts = [i for i, request in enumerate(policy.requests) if request["step"] == 0]
    assert len(firsts) == 2  # one episode start each
    for i, request in enumerate(policy.requests):
        if i in firsts:
            assert request["rtc"] is None  # nothing queued at an episode's first request
            continue
        fields = request["rtc"]
        assert fields is not None and set(fields) == {"prefix", "delay", "execution_horizon"}  # no guidance asked: the server's
        previous = events.chunks[i - 1]  # the chunk the queue held when this request was sent
        assert previous.episode == events.chunks[i].episode
        # Queued: the previous chunk from the step it arrived at (its obs step, plus the latency unless the loop
        # waited for it), n actions; executed up to this step.
        arrived = 0 if previous.chunk_id - 1 in firsts else latency
        remainder = previous.actions[request["step"] - previous.obs_step:arrived + n]
        assert len(remainder) >= 1
        assert fields["prefix"].dtype == np.float32 and np.array_equal(fields["prefix"], remainder)
        assert fields["delay"] == latency  # simulated time: the delay is known exactly
        assert 0 <= fields["delay"] <= len(fields["prefix"])
        assert fields["execution_horizon"] == len(remainder)  # default: the whole remainder


def test_horizon_and_guidance_options_are_sent():
    policy = ChunkPolicy()
    run_rtc(policy, latency=2, steps=30, n_action_steps=8, rtc_horizon=4, rtc_guidance=5.0)
    sent = [request["rtc"] for request in policy.requests if request["rtc"] is not None]
    assert sent
    for fields in sent:
        assert fields["guidance"] == 5.0
        assert fields["execution_horizon"] == min(max(4, fields["delay"]), len(fields["prefix"]))


def test_guidance_above_the_servers_limit_is_lowered_to_it(caplog):
    policy = ChunkPolicy()
    policy.metadata = PolicyMetadata(action_dim=ACTION_DIM, horizon=HORIZON, rtc=RTCSupport(guidance=5.0, max_guidance=20.0))
    with caplog.at_level(logging.WARNING, logger="policylink.runtime"):
        run_rtc(policy, latency=2, steps=30, n_action_steps=8, rtc_guidance=80.0)
    sent = [request["rtc"] for request in policy.requests if request["rtc"] is not None]
    assert sent and all(fields["guidance"] == 20.0 for fields in sent)
    assert sum("above the server's limit" in record.getMessage() for record in caplog.records) == 1


def test_real_time_delay_comes_from_the_latency_estimate():
    """On a real clock, d = ceil(latency * fps - 0.1), clamped to the queue; the horizon to [d, queue]."""

    def delay_for(estimate: float | None, queued: int = 8, **options: Any) -> tuple[int, int]:
        latency = LatencyEstimator(window=1)
        if estimate is not None:
            latency.add(estimate)
        executor = Executor(ChunkPolicy(), fake_env(10), rtc_config(fps=30.0, **options), clock=RealTimeClock(30.0), latency=latency)
        try:
            executor._queue = np.zeros((queued, ACTION_DIM), np.float32)
            request = executor._rtc_request()
        finally:
            executor.close()
        assert request is not None
        return request.delay, request.execution_horizon

    assert delay_for(None) == (0, 8)  # nothing measured yet
    assert delay_for(0.1) == (3, 8)  # 3 ticks at 30 Hz
    assert delay_for(0.1 + 1e-3) == (3, 8)  # tick jitter does not add a step
    assert delay_for(0.11) == (4, 8)  # a third of a tick more does: overestimated, never under
    assert delay_for(1.0, queued=5) == (5, 5)  # never beyond the queue
    assert delay_for(0.1, rtc_horizon=2) == (3, 3)  # the horizon is at least the delay ...
    assert delay_for(0.1, queued=5, rtc_horizon=9) == (3, 5)  # ... and at most the queue
    executor = Executor(ChunkPolicy(), fake_env(10), rtc_config(), clock=RealTimeClock(30.0))
    assert executor._rtc_request() is None  # nothing queued: no fields
    executor.close()


def test_rtc_makes_chunk_boundaries_smooth_against_a_flow_matching_server(serve):
    """The built-in flow policy samples every chunk from fresh noise: consecutive chunks disagree as a VLA's do.

    Latest-only execution jumps where they meet; with real-time chunking the
    server steers each new chunk onto the remainder the client sent. Not
    flaky: time is simulated (SteppedClock) and the server's noise is seeded,
    so each run is the same every time; measured: the largest rtc jump is
    about a fifth of latest-only's, and the mean jump at a boundary is about
    a within-chunk step.
    """
    pytest.importorskip("torch")
    pytest.importorskip("lerobot")
    for seed in (0, 1):
        jumps, within = {}, {}
        for merge in ("latest", "rtc"):
            server = serve(make_builtin_policy("flow", action_dim=ACTION_DIM, horizon=HORIZON, cameras=CAMERAS, seed=seed))
            events = Events()
            with PolicyClient(server.url) as client:
                config = ExecutorConfig(mode="async", merge=merge, n_action_steps=12, resume_max_delta=1e6)
                executor = Executor(client, fake_env(200), config, clock=SteppedClock(30, 4), listeners=[events])
                executor.run(episodes=1)
                executor.close()
            assert executor.status()["merge"] == merge
            assert executor.stats.chunks >= 15 and executor.stats.stalls == 0 and executor.stats.rejected_chunks == 0
            jumps[merge] = np.array(list(executor.stats.boundary_jumps))
            actions = np.stack([event.action for event in events.steps])
            same_chunk = np.array([a.chunk_id == b.chunk_id for a, b in zip(events.steps, events.steps[1:])])
            within[merge] = np.abs(np.diff(actions, axis=0)).max(axis=1)[same_chunk].mean()
        assert len(jumps["rtc"]) == len(jumps["latest"]) >= 14
        assert jumps["rtc"].max() < 0.5 * jumps["latest"].max(), (seed, jumps)
        assert jumps["rtc"].mean() < 0.5 * jumps["latest"].mean(), (seed, jumps)
        assert jumps["rtc"].mean() < 2 * within["rtc"]  # a boundary is about an ordinary step
        assert jumps["latest"].mean() > 3 * within["latest"]  # latest-only: a jump at every boundary


class Spy:
    """A client as the executor sees it, noting the keys of every observation it sends."""

    def __init__(self, client: PolicyClient) -> None:
        self.client = client
        self.sent: list[set[str]] = []

    @property
    def metadata(self) -> Any:
        return self.client.metadata

    def infer(self, obs: dict[str, Any]) -> Any:
        self.sent.append(set(obs))
        return self.client.infer(obs)

    def reset(self) -> None:
        self.client.reset()


def test_against_a_server_that_cannot_do_it_falls_back_to_latest_only_and_says_so_once(serve, caplog):
    policy = ReplayPolicy(action_dim=ACTION_DIM, horizon=HORIZON, cameras=CAMERAS)
    server = serve(policy)
    events = Events()
    with PolicyClient(server.url) as client, caplog.at_level(logging.WARNING, logger="policylink.runtime"):
        assert client.metadata.rtc is None
        spy = Spy(client)
        executor = Executor(spy, fake_env(40), rtc_config(n_action_steps=10), clock=SteppedClock(30, 3), listeners=[events])
        assert executor.status()["merge"] == "rtc"  # not known before the first request
        executor.run(episodes=2)
        executor.close()
    assert len(spy.sent) >= 8 and not any(RTC_KEY in keys for keys in spy.sent)
    assert [record.getMessage() for record in caplog.records].count(RTC_UNSUPPORTED) == 1
    assert executor.status()["merge"] == "latest (rtc unsupported)"
    # Latest-only with compensation: the replayed trajectory, step for step.
    assert executor.stats.stalls == 0 and len(events.steps) == 80
    for event in events.steps:
        np.testing.assert_array_equal(event.action, policy.trajectory[event.step])


def test_a_policy_without_metadata_or_rtc_support_gets_no_fields(caplog):
    calls: list[dict[str, Any]] = []

    def function(obs: dict[str, Any]) -> np.ndarray:  # a plain function: no metadata at all
        calls.append(obs)
        return np.zeros((HORIZON, ACTION_DIM), np.float32)

    unsupported = ChunkPolicy(rtc=False)
    for policy in (function, unsupported):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="policylink.runtime"):
            executor, _ = run_rtc(policy, steps=30, n_action_steps=8)
        assert [record.getMessage() for record in caplog.records].count(RTC_UNSUPPORTED) == 1
        assert executor.status()["merge"] == "latest (rtc unsupported)"
    assert len(calls) >= 3 and not any(RTC_KEY in obs for obs in calls)
    assert len(unsupported.requests) >= 3 and all(request["rtc"] is None for request in unsupported.requests)


def test_evaluation_episodes_pass_rtc_through():
    policy = ChunkPolicy()
    config = ExecutionConfig(mode="async", sim_latency_steps=2, n_action_steps=8, merge="rtc", rtc_horizon=5, max_steps=40)
    result = run_episode(fake_env(40), policy.infer, config, index=0, seed=0, metadata=policy.metadata)
    assert result.length == 40 and result.held_steps == 0
    sent = [request["rtc"] for request in policy.requests[1:]]
    assert sent and all(fields is not None and fields["delay"] == 2 for fields in sent)
    assert policy.requests[0]["rtc"] is None


def test_rtc_is_a_merge_rule_and_its_misconfigurations_are_refused():
    assert isinstance(make_merge_rule("rtc"), RTCSplice) and MERGE_RULES["rtc"] is RTCSplice
    old, new = np.zeros((2, 3), np.float32), np.ones((4, 3), np.float32)
    assert np.array_equal(RTCSplice().merge(old, new, np.ones(2, np.int64)), new)  # merging is latest-only
    with pytest.raises(ValueError, match="merge 'rtc' needs latency compensation"):
        ExecutorConfig(merge="rtc", compensate=False)
    with pytest.raises(ValueError, match="merge 'rtc' needs mode 'async'"):
        ExecutorConfig(merge="rtc", mode="sync")
    with pytest.raises(ValueError, match="apply to merge 'rtc' only"):
        ExecutorConfig(merge="latest", rtc_horizon=4)
    with pytest.raises(ValueError, match="rtc_horizon must be at least 1"):
        ExecutorConfig(merge="rtc", rtc_horizon=0)
    with pytest.raises(ValueError, match="rtc_guidance must be a number > 0"):
        ExecutorConfig(merge="rtc", rtc_guidance=float("nan"))
    with pytest.raises(ValueError, match="merge 'rtc' needs mode 'async'"):
        ExecutionConfig(mode="sync", merge="rtc")


@pytest.mark.parametrize("argv, message", [
    (["run", "--merge", "rtc", "--no-compensation"], "--merge rtc needs latency compensation"),
    (["run", "--merge", "rtc", "--mode", "sync"], "--merge rtc needs --mode async"),
    (["run", "--rtc.horizon", "4"], "--rtc.horizon and --rtc.guidance apply to --merge rtc only"),
    (["run", "--merge", "rtc", "--rtc.guidance", "0"], "--rtc.guidance must be > 0"),
    (["eval", "--merge", "rtc"], "--merge rtc needs --mode async"),  # eval's default mode is sync
])
def test_cli_refuses_rtc_flags_that_cannot_work_before_starting_anything(capsys, argv, message):
    assert main(argv) == 1
    assert message in capsys.readouterr().err
