"""Merge rules, safety filters, chunk validation and loop statistics on constructed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policylink.runtime.filters import (
    ActionMapping,
    ChunkRejected,
    ChunkValidator,
    FilterChain,
    GripperBinarize,
    JointLimits,
    MovingAverage,
    ReadyPose,
    VelocityLimit,
)
from policylink.runtime.merging import LatestOnly, TemporalEnsemble, WeightedAverage, make_merge_rule
from policylink.runtime.stats import LatencyEstimator, LoopStats, RollingWindow, format_summary

OLD = np.array([[1.0, 10.0], [1.0, 10.0], [1.0, 10.0]], np.float32)
NEW = np.array([[3.0, 20.0], [3.0, 20.0], [3.0, 20.0], [3.0, 20.0]], np.float32)
ONES = np.ones(3, np.int64)


def test_latest_only_takes_the_fresh_chunk():
    np.testing.assert_array_equal(LatestOnly().merge(OLD, NEW, ONES), NEW)


def test_weighted_average_mixes_03_old_07_new_on_the_overlap():
    merged = WeightedAverage(0.3).merge(OLD, NEW, ONES)
    np.testing.assert_allclose(merged[:3], [[2.4, 17.0]] * 3, rtol=1e-6)
    np.testing.assert_array_equal(merged[3], NEW[3])  # beyond the overlap: the fresh chunk
    assert merged.shape == NEW.shape and merged.dtype == np.float32


def test_temporal_ensemble_uses_exponential_weights():
    k = 0.5
    merged = TemporalEnsemble(k).merge(OLD, NEW, ONES)
    w_old, w_new = 1.0, math.exp(-k)  # the oldest prediction has weight exp(-k*0)
    expected = (w_old * 1.0 + w_new * 3.0) / (w_old + w_new)
    np.testing.assert_allclose(merged[:3, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(merged[3], NEW[3])


def test_temporal_ensemble_weighs_rows_by_how_many_predictions_they_average():
    counts = np.array([3, 2, 1])
    merged = TemporalEnsemble(0.0).merge(OLD, NEW, counts)  # k = 0: a plain running mean
    np.testing.assert_allclose(merged[:3, 0], [(3 * 1 + 3) / 4, (2 * 1 + 3) / 3, (1 + 3) / 2], rtol=1e-6)


def executed_like_act(rule, chunks: np.ndarray) -> np.ndarray:
    """The actions executed when ``rule`` merges each chunk into the queue, one step executed between chunks, as ACT does."""
    horizon, dim = chunks.shape[1:]
    queue, counts, executed = np.zeros((0, dim), np.float32), np.zeros(0, np.int64), []
    for chunk in chunks:  # queue aligned by step
        overlap = len(queue)
        merged = rule.merge(queue, chunk, counts)
        counts = np.concatenate([counts + 1, np.ones(horizon - overlap, np.int64)])
        executed.append(merged[0])
        queue, counts = merged[1:], counts[1:]
    return np.array(executed)


@pytest.mark.parametrize("k", [0.01, 0.5, -0.5])  # ACT's default, favouring older predictions, favouring newer ones
def test_temporal_ensemble_matches_lerobot_act_ensembler(k):
    torch = pytest.importorskip("torch")
    from lerobot.policies.act.modeling_act import ACTTemporalEnsembler

    rng = np.random.default_rng(0)
    horizon, dim = 5, 2
    # Each chunk predicts other values for the same steps (noise, plus a drift of 2 per chunk), so
    # what is executed depends on which predictions the rule weighs, and how much.
    chunks = (rng.normal(size=(4, horizon, dim)) + 2.0 * np.arange(4)[:, None, None]).astype(np.float32)
    reference = ACTTemporalEnsembler(k, horizon)
    expected = np.array([reference.update(torch.from_numpy(chunk[None]))[0].numpy() for chunk in chunks])
    np.testing.assert_allclose(executed_like_act(TemporalEnsemble(k), chunks), expected, rtol=1e-5, atol=1e-6)
    # The comparison tells the rules apart: the latest chunk alone, a fixed blend, or the
    # exponential weights in the wrong order (newest first) miss the reference by far.
    for wrong in (LatestOnly(), WeightedAverage(0.3), TemporalEnsemble(-k)):
        assert np.max(np.abs(executed_like_act(wrong, chunks) - expected)) > 1e-2, f"{wrong} would pass this comparison"


def test_unknown_merge_rule_is_named():
    with pytest.raises(ValueError, match="unknown merge rule 'blend'"):
        make_merge_rule("blend")


def test_moving_average_smooths_over_the_window():
    smooth = MovingAverage(3)
    outputs = [smooth(np.array([value], np.float32))[0] for value in (0, 3, 6, 9)]
    assert outputs == pytest.approx([0, 1.5, 3, 6])
    smooth.reset(None)
    assert smooth(np.array([9.0], np.float32))[0] == pytest.approx(9.0)


def test_velocity_limit_bounds_every_step_from_the_state():
    limit = VelocityLimit([0.1, 0.5])
    limit.reset(np.zeros(2, np.float32))
    rng = np.random.default_rng(1)
    previous = np.zeros(2, np.float32)
    for _ in range(50):
        command = limit(rng.uniform(-3, 3, 2).astype(np.float32))
        assert np.all(np.abs(command - previous) <= np.array([0.1, 0.5]) + 1e-6)
        previous = command
    assert np.any(np.abs(previous) > 0.05)  # it moves, it is not stuck


def test_joint_limits_clip():
    limits = JointLimits([-1, 0], [1, 2])
    np.testing.assert_array_equal(limits(np.array([-5.0, 5.0])), [-1, 2])
    with pytest.raises(ValueError, match="low <= high"):
        JointLimits(1, 0)


def test_gripper_binarisation_uses_the_threshold():
    grip = GripperBinarize([5], threshold=0.4, opened=0.0, closed=1.0)
    assert grip(np.array([0.2] * 5 + [0.41], np.float32))[5] == 1.0
    assert grip(np.array([0.2] * 5 + [0.39], np.float32))[5] == 0.0
    assert grip(np.array([0.2] * 5 + [0.39], np.float32))[0] == pytest.approx(0.2)  # other joints untouched


def test_action_mapping_16_to_22_holds_extra_joints():
    state = np.arange(22, dtype=np.float32)
    mapping = ActionMapping(22, range(16))
    mapping.reset(state)
    command = mapping(np.full(16, -1.0, np.float32))
    assert command.shape == (22,)
    np.testing.assert_array_equal(command[:16], -1.0)
    np.testing.assert_array_equal(command[16:], state[16:])  # head and torso hold their last position
    configured = ActionMapping(22, range(16), defaults=np.full(22, 7.0))
    configured.reset(state)
    np.testing.assert_array_equal(configured(np.zeros(16))[16:], 7.0)
    with pytest.raises(ValueError, match="action has 12 values, the mapping expects 16"):
        mapping(np.zeros(12))


def test_filter_chain_applies_in_order():
    chain = FilterChain([JointLimits(-1, 1), GripperBinarize([0], threshold=0.5)])
    assert chain(np.array([5.0, 5.0], np.float32)).tolist() == [1.0, 1.0]
    reversed_chain = FilterChain([GripperBinarize([0], threshold=0.5, closed=9.0), JointLimits(-1, 1)])
    assert reversed_chain(np.array([5.0, 5.0], np.float32)).tolist() == [1.0, 1.0]
    assert FilterChain([GripperBinarize([0], closed=9.0)])(np.array([5.0], np.float32)).tolist() == [9.0]


def test_ready_pose_ramp_ends_at_the_pose_in_small_steps():
    ramp = ReadyPose([1.0, -1.0], steps=10).ramp(np.zeros(2, np.float32))
    assert ramp.shape == (10, 2)
    np.testing.assert_allclose(ramp[-1], [1.0, -1.0])
    assert np.max(np.abs(np.diff(ramp, axis=0))) <= 0.1 + 1e-6


def test_chunk_validator_names_each_problem():
    validator = ChunkValidator(action_dim=2, limits=JointLimits(-1, 1), max_jump=0.5)
    validator.check(np.zeros((4, 2), np.float32), np.zeros(2))
    cases = [
        (np.zeros((4, 3), np.float32), "3 values per action, expected 2"),
        (np.array([[0, np.nan]], np.float32), "non-finite value"),
        (np.array([[0, 2.0]], np.float32), "leaves the joint limits"),
        (np.array([[0.9, 0.0]], np.float32), "jump bound"),
        (np.zeros(2, np.float32), "shape"),
    ]
    for chunk, message in cases:
        with pytest.raises(ChunkRejected, match=message):
            validator.check(chunk, np.zeros(2))


def test_latency_estimate_forgets_a_warmup_spike():
    estimator = LatencyEstimator(window=10, percentile=90)
    assert estimator.estimate() is None
    estimator.add(5.0)  # warm-up
    for _ in range(10):
        estimator.add(0.1)
    assert estimator.estimate() == pytest.approx(0.1)
    assert estimator.estimate() == pytest.approx(0.1)  # cached: asked every tick, recomputed only after an add
    for _ in range(10):
        estimator.add(0.3)
    assert estimator.estimate() == pytest.approx(0.3)


def test_loop_stats_summary():
    stats = LoopStats(fps=10)
    for tick, stalled in enumerate([False, True, True, False, True, False]):
        stats.tick(tick * 0.1 + (0.01 if tick == 3 else 0.0), stalled)
    stats.roundtrips_ms.extend([10, 20, 30])
    stats.boundary_jumps.extend([0.1, 0.5])
    summary = stats.summary()
    assert summary["stalls"] == 2 and summary["stalled_ticks"] == 3
    assert summary["stall_fraction"] == pytest.approx(0.5)
    assert summary["fps_achieved"] == pytest.approx(10.0)
    assert summary["jitter_p99_ms"] == pytest.approx(10.0, abs=0.5)
    assert summary["roundtrip_p50_ms"] == pytest.approx(20)
    assert summary["max_boundary_jump"] == pytest.approx(0.5)
    assert summary["max_stall_ticks"] == 2 and summary["jitter_max_ms"] == pytest.approx(10.0)
    assert "rate" in format_summary(summary) and "(last" not in format_summary(summary)


def test_rolling_window_keeps_the_recent_samples_and_exact_totals():
    window = RollingWindow(3)
    assert not window and len(window) == 0 and window.percentile(50) == 0.0 and window.run_mean == 0.0
    window.extend([5.0, 1.0, 2.0, 3.0, 4.0])
    assert list(window) == [2.0, 3.0, 4.0] and len(window) == 3 and window[-1] == 4.0 and window[0] == 2.0
    assert window.count == 5 and window.total == 15.0 and window.run_mean == 3.0
    assert np.mean(window) == 3.0 and np.max(window) == 4.0  # numpy sees the window's samples (2, 3, 4) only
    assert window.minimum == 1.0 and window.maximum == 5.0  # whole run, though both left the window
    assert window.percentile(50) == 3.0  # the window only
    window.append(10.0)
    np.testing.assert_array_equal(window.values(), [3.0, 4.0, 10.0])
    with pytest.raises(ValueError):
        RollingWindow(0)


def test_loop_stats_percentiles_cover_the_window_and_totals_the_whole_run():
    stats = LoopStats(fps=10, tick_window=100, roundtrip_window=10, jump_window=10)
    for tick in range(1000):
        # The first 500 intervals are 20 ms late, the rest on time; one stall of 3 ticks early on.
        stats.tick(tick * 0.1 + (0.02 * tick if tick < 500 else 0.02 * 499), 5 <= tick < 8)
    stats.roundtrips_ms.extend([500.0] + [10.0] * 50)
    stats.boundary_jumps.extend([0.9] + [0.1] * 50)
    summary = stats.summary()
    assert summary["ticks"] == 1000 and summary["tick_intervals"] == 999 and summary["jitter_window"] == 100
    assert summary["jitter_p99_ms"] == pytest.approx(0.0, abs=1e-6)  # the recent window is on time
    assert summary["jitter_max_ms"] == pytest.approx(20.0)  # the whole run's worst interval
    assert stats.achieved_fps == pytest.approx(999 / (999 * 0.1 + 0.02 * 499))  # exact over the run
    assert summary["stalls"] == 1 and summary["max_stall_ticks"] == 3 and summary["stall_fraction"] == pytest.approx(0.003)
    assert summary["roundtrip_p99_ms"] == pytest.approx(10.0) and summary["roundtrip_max_ms"] == pytest.approx(500.0)
    assert summary["roundtrips"] == 51 and summary["roundtrip_window"] == 10
    assert summary["max_boundary_jump"] == pytest.approx(0.9) and summary["boundary_jumps"] == 51
    text = format_summary(summary)
    assert "(last 100)" in text and "(last 10)" in text and "max 500.0 ms" in text


def test_loop_stats_episode_boundaries_are_no_interval_and_no_stall():
    stats = LoopStats(fps=10)
    stats.tick(0.0, True)
    stats.tick(0.1, True)
    stats.end_episode()
    stats.tick(100.0, True)  # a new episode: no 99.9 s interval, and a new stall
    assert stats.tick_intervals.count == 1 and stats.achieved_fps == pytest.approx(10.0)
    assert stats.stalls == 2 and stats.max_stall_ticks == 2
