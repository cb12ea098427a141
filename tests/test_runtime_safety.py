"""Safe by default: bounds from the policy and the robot, a resume ramp, watchdog actions, the CLI for all of it."""

from __future__ import annotations

import subprocess
import threading

import numpy as np
import pytest
from conftest import POLICYLINK

from policylink import PolicyClient
from policylink.envs.fake import FakeEnv
from policylink.policies import ConstantPolicy, ReplayPolicy
from policylink.runtime.clock import SteppedClock
from policylink.runtime.executor import Executor, ExecutorConfig
from policylink.runtime.filters import ActionMapping, ChunkRejected, ChunkValidator, FilterChain, JointLimits, ReadyPose, VelocityLimit
from policylink.runtime.safety import ActionBounds, Backoff, ResumeRamp
from policylink.types import PolicyMetadata


class Steps:
    def __init__(self) -> None:
        self.steps, self.episodes = [], []

    def on_step(self, event):
        self.steps.append(event)

    def on_episode(self, event):
        self.episodes.append(event)


# -- bounds -------------------------------------------------------------------------------------


def test_policy_bounds_come_from_the_metadata_widened_by_the_margin():
    metadata = PolicyMetadata(action_dim=2, horizon=4, action_low=(0.0, -1.0), action_high=(10.0, 1.0))
    bounds = ActionBounds.from_metadata(metadata, margin=0.1)
    np.testing.assert_allclose(bounds.low, [-1.011, -1.202], atol=1e-6)
    np.testing.assert_allclose(bounds.high, [11.011, 1.202], atol=1e-6)
    assert ActionBounds.from_metadata(PolicyMetadata(action_dim=2, horizon=4)) is None
    assert bounds.outside(np.array([[0.0, 0.0], [0.0, 1.3]])) == (1, 1)
    with pytest.raises(ValueError, match="6 values each"):
        PolicyMetadata(action_dim=6, horizon=4, action_low=(0.0,), action_high=(1.0,))


def test_builtin_policies_announce_what_they_can_return():
    replay = ReplayPolicy(action_dim=3)
    assert replay.metadata.action_low == tuple(float(v) for v in replay.trajectory.min(axis=0))
    assert ConstantPolicy(value=0.5, action_dim=2).metadata.action_high == (0.5, 0.5)
    back = PolicyMetadata.from_dict(replay.metadata.to_dict())
    assert (back.action_low, back.action_high) == (replay.metadata.action_low, replay.metadata.action_high)


def test_executor_refuses_to_start_without_any_bounds():
    class Unknown(FakeEnv):
        def action_bounds(self):
            return None

    def policy(obs):
        return np.zeros((4, 6), np.float32)

    with pytest.raises(ValueError, match="no action bounds known"):
        Executor(policy, Unknown(image_size=(8, 8)))
    executor = Executor(policy, Unknown(image_size=(8, 8)), allow_unbounded=True)  # asked for explicitly
    assert executor.bounds is None and executor.robot_bounds is None
    executor.close()


def test_commands_are_bounded_in_the_robots_space_after_the_mapping():
    """A 2-d policy drives joints 0 and 1 of a 6-d arm; the arm's own range bounds every command."""

    def policy(obs):  # far outside the arm's range, but the policy announces no range: only the arm's applies
        return np.full((8, 2), 50.0, np.float32)

    env, steps = FakeEnv(image_size=(8, 8), episode_steps=40, lag=1.0), Steps()
    executor = Executor(policy, env, ExecutorConfig(mode="sync", resume_max_delta=1e6), clock=SteppedClock(30, 0),
                        filters=[ActionMapping(6, [0, 1], hold={5: 0.25})], listeners=[steps])
    executor.run(episodes=1)
    executor.close()
    commands = np.array([event.action for event in steps.steps])
    assert commands.shape == (40, 6)
    np.testing.assert_allclose(commands[:, :2], np.pi, atol=1e-6)  # clipped to the arm's [-pi, pi]
    np.testing.assert_allclose(commands[:, 5], 0.25)  # the held joint stays where --action.hold put it


def test_jump_check_compares_in_the_robots_space_after_a_mapping():
    validator = ChunkValidator(action_dim=2, max_jump=0.5)
    validator.indices = np.array([3, 4])
    state = np.array([9, 9, 9, 0.0, 0.0, 9], np.float32)
    validator.check(np.zeros((4, 2), np.float32), state)  # joints 3 and 4 are at 0: no jump
    with pytest.raises(ChunkRejected, match="starts 1 away"):
        validator.check(np.ones((4, 2), np.float32), state)


def test_a_velocity_limit_before_the_mapping_limits_the_first_command_too():
    mapping, limit = ActionMapping(4, [2, 3]), VelocityLimit(0.1)
    chain = FilterChain([limit, mapping])
    chain.reset(np.array([5.0, 5.0, 1.0, 1.0], np.float32))
    np.testing.assert_allclose(chain(np.array([3.0, -3.0], np.float32)), [5.0, 5.0, 1.1, 0.9], atol=1e-6)


# -- the resume ramp -----------------------------------------------------------------------------


def test_resume_ramp_moves_at_most_twice_the_normal_step_then_follows():
    ramp = ResumeRamp(factor=2.0, floor=1e-6)
    ramp.ramping = False
    command = np.zeros(1, np.float32)
    for target in np.arange(1, 11, dtype=np.float32) * 0.01:  # normal running: 0.01 per tick
        command = ramp(np.array([target]), command)
    ramp.interrupt()
    commands, previous = [], command
    for _ in range(40):  # the trajectory resumed 0.2 further on and keeps moving 0.01 per tick
        target = np.array([0.3 + 0.01 * len(commands)], np.float32)
        previous = ramp(target, previous)
        commands.append(float(previous[0]))
    steps = np.diff([float(command[0])] + commands)
    assert np.all(steps <= 0.02 + 1e-6)  # never more than twice the normal step
    assert steps[0] == pytest.approx(0.02, abs=1e-6)  # it did ramp, it did not jump 0.2
    assert not ramp.ramping and commands[-1] == pytest.approx(0.3 + 0.39, abs=1e-6)  # caught up, following exactly


def test_backoff_doubles_up_to_a_ceiling():
    backoff = Backoff(0.05, 1.0)
    assert [backoff.failed() for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.succeeded()
    assert backoff.failed() == 0.05


# -- watchdog actions and the ready pose ----------------------------------------------------------


class StoppableArm(FakeEnv):
    def __init__(self, **options):
        super().__init__(**options)
        self.stopped = threading.Event()

    def safe_stop(self) -> bool:
        self.stopped.set()
        return True


def test_watchdog_stop_stops_the_robot_and_ends_the_episode(serve):
    server = serve(ReplayPolicy(action_dim=6, horizon=8))
    env, steps = StoppableArm(image_size=(8, 8), episode_steps=10**6), Steps()
    with PolicyClient(server.url, timeout=1.0) as client:  # the request in flight when the server dies gives up soon
        executor = Executor(client, env, ExecutorConfig(watchdog_s=0.2, watchdog_action="stop", n_action_steps=8), listeners=[steps])
        thread = threading.Thread(target=executor.run, kwargs={"episodes": 1})
        thread.start()
        while len(steps.steps) < 5:
            thread.join(0.01)
        server.stop()  # no more chunks: the watchdog trips
        thread.join(30)
        executor.close()
    assert not thread.is_alive() and env.stopped.is_set()
    assert steps.episodes[-1].info["reason"] == "watchdog stop"
    with pytest.raises(ValueError, match="needs an environment with a safe stop"):
        Executor(lambda obs: np.zeros((4, 6)), FakeEnv(image_size=(8, 8)), ExecutorConfig(watchdog_action="stop"))
    with pytest.raises(ValueError, match="needs a ready pose"):
        Executor(lambda obs: np.zeros((4, 6)), FakeEnv(image_size=(8, 8)), ExecutorConfig(watchdog_action="ready"))


def test_ready_pose_goes_through_the_robot_filters_and_a_reset_cuts_it_short():
    pose = np.full(6, 2.0, np.float32)
    env, steps = FakeEnv(image_size=(8, 8), episode_steps=5, lag=1.0), Steps()
    reset_now = threading.Event()

    class Watching(VelocityLimit):
        def __call__(self, action):
            if len(ramped) == 3:
                executor.reset_episode()  # an operator reset in the middle of the ramp
                reset_now.set()
            command = super().__call__(action)
            ramped.append(command)
            return command

    ramped: list = []

    def policy(obs):
        return np.zeros((8, 6), np.float32)

    executor = Executor(policy, env, ExecutorConfig(mode="sync"), clock=SteppedClock(30, 0), filters=[Watching(0.05)],
                        ready_pose=ReadyPose(pose, steps=30), listeners=[steps])
    executor.run(episodes=2)
    executor.close()
    assert reset_now.is_set()
    deltas = np.abs(np.diff(np.array(ramped[:3]), axis=0))
    assert np.all(deltas <= 0.05 + 1e-6)  # the ramp went through the velocity limit
    assert steps.episodes[1].info["reason"] == "operator reset" and steps.episodes[1].steps == 0  # cut short, no policy step


# -- the CLI --------------------------------------------------------------------------------------


def run_cli(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*POLICYLINK, "run", "--env.image_size", "24x32", *flags], capture_output=True, text=True, timeout=timeout)


def test_negative_filter_limits_with_a_space_are_accepted():
    out = run_cli("--policy.type", "replay", "--filter.limits", "-3,3", "--episodes", "1", "--max-steps", "10", "--sim-latency-steps", "1")
    assert out.returncode == 0, out.stderr


def test_a_policy_outside_the_limits_ends_the_run_with_an_error_not_a_request_storm():
    out = run_cli("--policy.type", "constant", "--policy.value", "5", "--filter.limits", "-1,1", "--episodes", "1", "--first-chunk-attempts", "3")
    assert out.returncode == 1
    assert "no usable first chunk after 3 attempts" in out.stderr and "leaves the joint limits: 5" in out.stderr


def test_sim_latency_cannot_drive_a_real_robot():
    out = run_cli("--env", "robot", "--robot.port", "/dev/null", "--sim-latency-steps", "2", "--policy.type", "zeros")
    assert out.returncode == 1 and "cannot drive a real robot" in out.stderr


def test_action_map_and_hold_from_the_cli():
    from policylink.cli import build_parser
    from policylink.cli.run import action_mapping

    args = build_parser().parse_args(["run", "--action.map", "22:0-15", "--action.hold", "16=0.5,21=-1"])
    mapping = action_mapping(args, 22)
    assert mapping.indices.tolist() == list(range(16)) and mapping.hold == {16: 0.5, 21: -1.0}
    with pytest.raises(ValueError, match="maps onto 22 joints, but the fake environment has 6"):
        action_mapping(args, 6)
    out = run_cli("--policy.type", "replay", "--policy.action_dim", "4", "--action.map", "6:0-3", "--action.hold", "4=0.1",
                  "--episodes", "1", "--max-steps", "10", "--sim-latency-steps", "1", "--ready-pose", "0,0,0,0,0.1,0", "--ready-s", "0.2")
    assert out.returncode == 0, out.stderr


def test_filter_limits_are_the_bounds_when_neither_policy_nor_robot_has_any():
    """What the refusal tells the user to do works: --filter.limits gives the executor its bounds."""
    from policylink.cli import build_parser, join_negative_values
    from policylink.cli.run import make_executor

    class Unknown(FakeEnv):
        def action_bounds(self):
            return None

    metadata = PolicyMetadata(action_dim=6, horizon=8)  # no action range announced

    def policy(obs):
        return np.zeros((8, 6), np.float32)

    args = build_parser().parse_args(join_negative_values(["run", "--filter.limits", "-2,2"]))
    executor = make_executor(args, policy, Unknown(image_size=(8, 8)), metadata)
    np.testing.assert_array_equal(executor.bounds.low, np.full(6, -2.0))
    np.testing.assert_array_equal(executor.bounds.high, np.full(6, 2.0))
    executor.close()
    with pytest.raises(ValueError, match="CLI: --filter.limits LOW,HIGH"):
        make_executor(build_parser().parse_args(["run"]), policy, Unknown(image_size=(8, 8)), metadata)
