"""``policylink run``: drive an environment with a remote policy at a fixed control rate."""

from __future__ import annotations

import argparse
import logging
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import ServerError
from ..runtime.merging import MERGE_RULES
from .config import add_config_flags

HELP = """\
Run a policy on an environment: a control loop at --fps pops one action per
tick from the chunks the server sends, in sync or async mode, through the
safety filters, and prints a live status line and a summary of the loop
statistics (rate, jitter, stalls, round trips, boundary jumps).

Without --server, a local server is started on 127.0.0.1 with the built-in
policy chosen by --policy.type (shaped like the environment unless --policy.*
says otherwise) or the LeRobot checkpoint in --policy.path.
"""

EXAMPLES = """\
examples:
  policylink run --policy.type replay --policy.latency_ms 100 --mode async
  policylink run --server ws://gpu-box:8000 --env fake --env.layout bimanual --fps 30 --mode async --episodes 3
  policylink run --server ws://gpu-box:8000 --env replay --env.path episode.npz
  policylink run --server ws://gpu-box:8000 --env robot --robot.port /dev/ttyACM0 --robot.cameras front=0:480x640
"""


def add_parser(subparsers: Any) -> None:
    from ._watch import add_watch_flags
    from .serve import add_policy_flags

    parser = subparsers.add_parser(
        "run", help="drive an environment (fake, replay, robot) with a policy at a fixed rate",
        description=HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(parser)
    parser.add_argument("--server", default=None, help="policy server URL, ws://host:port (default: start a local server with --policy.type)")
    parser.add_argument("--api-key", default=os.environ.get("POLICYLINK_API_KEY"), help="API key the server requires (default: $POLICYLINK_API_KEY)")
    parser.add_argument("--ca-file", default=None, metavar="PEM", help="wss:// or grpcs://: the CA certificate that signed the server's (default: the system's roots)")
    add_image_codec_flags(parser)
    env = parser.add_argument_group("environment")
    env.add_argument("--env", dest="env", default="fake", choices=["fake", "replay", "robot"], help="environment (default: fake)")
    env.add_argument("--env.task", dest="env_task", default=None, choices=["lift", "sort", "stack"],
                     help="fake: one of the seeds' grasp-cube tasks: lift and stack one arm (6-d), sort two (12-d); cameras front, "
                          "left_wrist, right_wrist at 480x640; instruction 'lift the cube', 'sort the cubes' or 'stack the cubes' "
                          "unless --task gives one. --env.cameras (a subset) and --env.image_size refine it; a contradicting "
                          "--env.layout is refused (not to be confused with --task, the language instruction)")
    env.add_argument("--env.layout", dest="env_layout", default=None, choices=["single", "bimanual"], help="fake: single arm (6-d) or bimanual (12-d) (default: single, or --env.task's)")
    env.add_argument("--env.cameras", dest="env_cameras", default=None, help="fake: comma-separated camera names, 0 to 3 (default: the layout's one camera, or --env.task's three)")
    env.add_argument("--env.image_size", dest="env_image_size", default=None, help="fake: camera image size HxW (default: 480x640)")
    env.add_argument("--env.keys", dest="env_keys", default="lerobot", choices=["lerobot", "openpi"],
                     help="fake: observation keys: lerobot (observation.state, observation.images.<camera>, task) or openpi "
                          "(observation/state, observation/image for the first camera, observation/<camera>_image for the "
                          "others, prompt) (default: lerobot)")
    env.add_argument("--env.episode_steps", dest="env_episode_steps", type=int, default=300, help="fake: steps per episode (default: 300)")
    env.add_argument("--env.path", dest="env_path", default=None, help="replay: an episode .npz or a LeRobot dataset directory")
    env.add_argument("--env.episode", dest="env_episode", type=int, default=0, help="replay: episode index in a LeRobot dataset (default: 0)")
    robot = parser.add_argument_group("LeRobot SO-100 / SO-101 follower (--env robot; needs the [robot] extra)")
    robot.add_argument("--robot.model", dest="robot_model", default="so101", choices=["so100", "so101"], help="follower model (default: so101)")
    robot.add_argument("--robot.port", dest="robot_port", default=None, help="serial port of a single follower arm, e.g. /dev/ttyACM0")
    robot.add_argument("--robot.left_port", dest="robot_left_port", default=None, help="bimanual: serial port of the left arm")
    robot.add_argument("--robot.right_port", dest="robot_right_port", default=None, help="bimanual: serial port of the right arm")
    robot.add_argument("--robot.id", dest="robot_id", default=None, help="robot id, names LeRobot's calibration file")
    robot.add_argument("--robot.cameras", dest="robot_cameras", default="", metavar="NAME=INDEX:HxW,...", help="OpenCV cameras, e.g. front=0:480x640,wrist=/dev/video2:480x640")
    robot.add_argument("--robot.max_relative_target", dest="robot_max_relative_target", type=float, default=None, help="LeRobot's own per-command clip of the motion from the present position")
    loop = parser.add_argument_group("control loop")
    loop.add_argument("--fps", type=float, default=30.0, help="control rate in Hz (default: 30)")
    loop.add_argument("--mode", default="async", choices=["sync", "async"], help="sync: infer, execute, infer again; async: request the next chunk in the background (default: async)")
    loop.add_argument("--merge", default="latest", choices=sorted(MERGE_RULES),
                      help="how overlapping chunks combine (default: latest); rtc: real-time chunking, async only: each request carries "
                           "the queued actions and the expected delay, and the new chunk is spliced in exactly where it arrives "
                           "(latest-only, with a warning, against a server whose policy cannot do it)")
    loop.add_argument("--merge.old_weight", dest="merge_old_weight", type=float, default=0.3, help="average: weight of the queued actions (default: 0.3, as LeRobot)")
    loop.add_argument("--merge.k", dest="merge_k", type=float, default=0.01, help="ensemble: exponential weight factor (default: 0.01, as ACT)")
    add_rtc_flags(loop)
    loop.add_argument("--n-action-steps", type=int, default=None, help="actions used per chunk (default: the policy's n_action_steps)")
    loop.add_argument("--threshold", type=float, default=0.5, help="async: request when this fraction of n-action-steps is left (default: 0.5)")
    loop.add_argument("--no-compensation", dest="compensate", action="store_false", help="execute late chunks from their start instead of dropping elapsed actions")
    loop.add_argument("--watchdog-s", type=float, default=1.0, help="hold and report when no fresh action came for this long; older chunks are rejected (default: 1.0)")
    loop.add_argument("--episodes", type=int, default=1, help="episodes to run (default: 1)")
    loop.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: until the environment ends it)")
    loop.add_argument("--sim-latency-steps", type=int, default=None, metavar="N", help="simulated time: no sleeping, each reply arrives N steps after its request")
    loop.add_argument("--task", default=None, help="language instruction sent with every observation")
    safety = parser.add_argument_group("safety (defaults are safe: see docs/runtime.md); filters apply in this order")
    safety.add_argument("--action.map", dest="action_map", default=None, metavar="ROBOT_DIM:JOINTS",
                        help="place the policy's actions into a larger robot vector, e.g. 22:0-15 (policy value i drives the i-th listed joint)")
    safety.add_argument("--action.hold", dest="action_hold", default=None, metavar="JOINT=VALUE,...",
                        help="with --action.map: hold these undriven joints at these values (the others hold their position at episode start)")
    safety.add_argument("--filter.smooth", dest="filter_smooth", type=int, default=None, metavar="N", help="moving average over N actions")
    safety.add_argument("--filter.limits", dest="filter_limits", default=None, metavar="LOW,HIGH", help="clip every joint to [LOW, HIGH]; chunks outside are rejected")
    safety.add_argument("--filter.max_delta", dest="filter_max_delta", type=float, default=None, metavar="X", help="per-step velocity limit: no joint moves more than X per tick")
    safety.add_argument("--filter.gripper", dest="filter_gripper", default=None, metavar="IDX[,IDX]:THRESH", help="binarise these joints at THRESH (e.g. 5:0.5)")
    safety.add_argument("--filter.max_jump", dest="filter_max_jump", type=float, default=None, metavar="X", help="reject chunks starting more than X from the current state")
    safety.add_argument("--ready-pose", dest="ready_pose", default=None, metavar="V,V,...", help="move to this robot pose (through the filters) before each episode")
    safety.add_argument("--ready-s", dest="ready_s", type=float, default=2.0, metavar="S", help="time the ready-pose ramp takes (default: 2)")
    safety.add_argument("--watchdog-action", default="hold", choices=["hold", "ready", "stop"],
                        help="when the watchdog trips: hold the last command, move to the ready pose, or stop the robot (torque off) and end the episode (default: hold)")
    safety.add_argument("--bounds-margin", type=float, default=0.1, metavar="F",
                        help="refuse chunks outside the policy's announced action range widened by F of it (default: 0.1)")
    safety.add_argument("--no-policy-bounds", action="store_true", help="ignore the policy's announced action range (the robot's joint ranges still apply)")
    safety.add_argument("--allow-unbounded", action="store_true", help="run even when neither the policy nor the environment gives any action range (unsafe)")
    safety.add_argument("--resume-max-delta", type=float, default=None, metavar="X",
                        help="after a stall, rejoin the trajectory at most X per joint per tick (default: twice the largest normal per-tick change)")
    safety.add_argument("--first-chunk-attempts", type=int, default=10, metavar="N", help="failed or rejected first chunks before an episode ends with an error (default: 10)")
    add_policy_flags(parser)
    parser.set_defaults(action_dim=None)  # a local built-in policy takes the environment's shape
    add_watch_flags(parser)
    parser.set_defaults(func=run)


def add_image_codec_flags(parser: Any) -> None:
    """``--image-codec`` and ``--image-quality``: how the client sends camera frames."""
    parser.add_argument("--image-codec", default="raw", choices=["raw", "jpeg"],
                        help="how camera frames travel: raw arrays (default) or JPEG, for links slower than about 1 Gbit/s "
                             "(needs the [jpeg] extra; see docs/protocol.md)")
    parser.add_argument("--image-quality", type=int, default=90, metavar="Q", help="--image-codec jpeg: quality 1-100 (default: 90)")


def add_rtc_flags(group: Any) -> None:
    """``--rtc.horizon`` and ``--rtc.guidance``: what an executor with ``--merge rtc`` asks of the server."""
    group.add_argument("--rtc.horizon", dest="rtc_request_horizon", type=int, default=None, metavar="N",
                       help="--merge rtc: how many of the queued actions sent with a request guide the new chunk (its execution "
                            "horizon; at least the expected delay, at most the queue; default: all of them)")
    group.add_argument("--rtc.guidance", dest="rtc_request_guidance", type=float, default=None, metavar="W",
                       help="--merge rtc: guidance weight asked of the server, how strongly the new chunk is pulled onto the queued "
                            "actions (default: the server's, see its --policy.rtc_guidance; lowered to the server's limit)")


def check_rtc_flags(args: argparse.Namespace, mode: str, compensate: bool = True) -> None:
    """Refuse ``--rtc.*`` without ``--merge rtc``, and ``--merge rtc`` where it cannot work (before anything starts)."""
    if args.merge != "rtc":
        if args.rtc_request_horizon is not None or args.rtc_request_guidance is not None:
            raise ValueError("--rtc.horizon and --rtc.guidance apply to --merge rtc only")
        return
    if mode != "async":
        raise ValueError("--merge rtc needs --mode async: in sync mode nothing is queued when a chunk is requested, so there is nothing to continue")
    if not compensate:
        raise ValueError("--merge rtc needs latency compensation (drop --no-compensation): the new chunk is spliced in after the steps that passed")
    if args.rtc_request_horizon is not None and args.rtc_request_horizon < 1:
        raise ValueError(f"--rtc.horizon must be at least 1, got {args.rtc_request_horizon}")
    if args.rtc_request_guidance is not None and not args.rtc_request_guidance > 0:
        raise ValueError(f"--rtc.guidance must be > 0, got {args.rtc_request_guidance}")


def run(args: argparse.Namespace) -> int:
    from ..client import PolicyClient
    from ..runtime.stats import format_summary

    if args.sim_latency_steps is not None and args.env == "robot":  # before any hardware is touched
        raise ValueError("--sim-latency-steps simulates time without waiting: it cannot drive a real robot (--env robot)")
    check_rtc_flags(args, args.mode, args.compensate)
    with make_env(args) as env, _server(args, env) as url, PolicyClient(
        url, api_key=args.api_key, ca_file=args.ca_file, image_codec=args.image_codec, quality=args.image_quality
    ) as client:
        metadata = client.metadata if client.speaks_policylink else learn_plain_server(client, env)
        if metadata is None:
            raise ValueError(f"the server at {url} has no model loaded; start it with a policy, or load one with 'policylink infer --server {url} --policy.path CHECKPOINT'")
        mapping = action_mapping(args, env.action_dim)
        expected = len(mapping.indices) if mapping is not None else env.action_dim
        if metadata.action_dim != expected:
            via = f" (through --action.map {args.action_map})" if mapping is not None else ""
            raise ValueError(f"the policy returns {metadata.action_dim}-d actions but the {env.name} environment takes {expected}{via}")
        print(f"policylink run: {metadata.model_id} at {url} on {env!r}, {args.mode} at {args.fps:g} Hz", flush=True)
        summary, errors = _drive(args, client, env, metadata)
    print("policylink run: summary", flush=True)
    print(format_summary(summary), flush=True)
    for error in errors:
        print(f"policylink run: {error}", file=sys.stderr, flush=True)
    if hasattr(env, "report"):  # a replayed episode: how far the served actions were from the recorded ones
        report = env.report()
        if report.get("steps"):
            print(f"  replay     last episode, {report['steps']} steps: mean |served - recorded| {report['mean_abs_error']:.5f}, max {report['max_abs_error']:.5f}", flush=True)
    return 1 if errors else 0


def learn_plain_server(client: Any, env: Any) -> Any:
    """A plain (openpi) server announces no action size: send the environment's first observation once and read it off the reply."""
    print(f"policylink run: {client.url} is not a policylink server (openpi protocol); "
          "learning its action size and horizon from one request", flush=True)
    observation = env.reset()
    try:
        client.infer(observation)
    except ServerError as exc:
        keys = ", ".join(sorted(observation))
        raise ValueError(f"the server at {client.url} refused the environment's first observation ({keys}): "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}. openpi policies usually read "
                         "'observation/state', 'observation/image' and 'prompt': try --env.keys openpi") from None
    return client.metadata


def _drive(args: argparse.Namespace, client: Any, env: Any, metadata: Any) -> dict[str, Any]:
    from ._watch import Watchers, client_settings

    executor = make_executor(args, client, env, metadata)
    info = {"policy": metadata.to_dict(), "server": client.url, "env": env.name, "mode": args.mode, "fps": args.fps, "client": client_settings(args)}
    with Watchers(args, metadata=info, fps=args.fps) as watchers:
        for listener in watchers.listeners:
            executor.add_listener(listener)
        watchers.attach(executor)
        with _live_status(executor):
            try:
                executor.run(episodes=args.episodes)
            finally:
                executor.close()
    errors = [f"episode {result['episode']}: {result['info']['error']}" for result in executor.episode_results if result["info"].get("error")]
    return executor.stats.summary(), errors


def make_executor(args: argparse.Namespace, client: Any, env: Any, metadata: Any) -> Any:
    """The executor, clock, filters and validator the flags ask for."""
    from ..runtime.clock import RealTimeClock, SteppedClock
    from ..runtime.executor import Executor, ExecutorConfig
    from ..runtime.filters import ChunkValidator, GripperBinarize, JointLimits, MovingAverage, ReadyPose, VelocityLimit
    from ..runtime.merging import make_merge_rule
    from .serve import control_from_args

    merge_options = {"average": {"old_weight": args.merge_old_weight}, "ensemble": {"k": args.merge_k}}.get(args.merge, {})
    config = ExecutorConfig(
        mode=args.mode, fps=args.fps, n_action_steps=args.n_action_steps or metadata.n_action_steps,
        threshold=args.threshold, compensate=args.compensate, merge=make_merge_rule(args.merge, **merge_options),
        watchdog_s=args.watchdog_s, max_steps=args.max_steps, task=args.task, watchdog_action=args.watchdog_action,
        first_chunk_attempts=args.first_chunk_attempts, bounds_margin=args.bounds_margin, resume_max_delta=args.resume_max_delta,
        rtc_horizon=args.rtc_request_horizon, rtc_guidance=args.rtc_request_guidance,
    )
    clock = SteppedClock(args.fps, args.sim_latency_steps) if args.sim_latency_steps is not None else RealTimeClock(args.fps)
    mapping = action_mapping(args, env.action_dim)
    filters: list[Any] = [mapping] if mapping is not None else []  # first: the other filters act on the robot's vector
    limits = None
    if args.filter_smooth:
        filters.append(MovingAverage(args.filter_smooth))
    if args.filter_limits:
        low, high = _floats(args.filter_limits, "--filter.limits", 2)
        limits = JointLimits(low, high)
        filters.append(limits)
    if args.filter_max_delta:
        filters.append(VelocityLimit(args.filter_max_delta))
    if args.filter_gripper:
        indices, _, threshold = args.filter_gripper.partition(":")
        filters.append(GripperBinarize([int(i) for i in indices.split(",")], threshold=float(threshold or 0.5)))
    validator = ChunkValidator(limits=limits, max_jump=args.filter_max_jump)
    ready = None
    if args.ready_pose:
        pose = _floats(args.ready_pose, "--ready-pose", env.action_dim)
        ready = ReadyPose(pose, steps=max(1, round(args.ready_s * args.fps)))
    return Executor(
        client, env, config, clock=clock, filters=filters, validator=validator, ready_pose=ready,
        bounds=(limits.low, limits.high) if limits is not None else None,  # --filter.limits replaces the policy's range
        use_policy_bounds=not args.no_policy_bounds, allow_unbounded=args.allow_unbounded,
        control=control_from_args(args) if getattr(args, "server", None) else None,  # a local server declares it itself
    )


def action_mapping(args: argparse.Namespace, robot_dim: int) -> Any:
    """The :class:`ActionMapping` of ``--action.map ROBOT_DIM:JOINTS`` and ``--action.hold``, or ``None``."""
    from ..runtime.filters import ActionMapping

    if not args.action_map:
        if args.action_hold:
            raise ValueError("--action.hold needs --action.map")
        return None
    dim_text, _, joints = args.action_map.partition(":")
    try:
        dim = int(dim_text)
        indices = [index for part in joints.split(",") if part.strip() for index in _joint_range(part.strip())]
    except ValueError:
        raise ValueError(f"bad --action.map {args.action_map!r}: expected ROBOT_DIM:JOINTS, e.g. 22:0-15 or 14:0-5,7-12") from None
    if dim != robot_dim:
        raise ValueError(f"--action.map maps onto {dim} joints, but the {args.env} environment has {robot_dim}")
    hold = {}
    for item in filter(None, (part.strip() for part in (args.action_hold or "").split(","))):
        joint, _, value = item.partition("=")
        try:
            hold[int(joint)] = float(value)
        except ValueError:
            raise ValueError(f"bad --action.hold item {item!r}: expected JOINT=VALUE, e.g. 16=0.0") from None
    return ActionMapping(dim, indices, hold=hold)


def _joint_range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)




def make_env(args: argparse.Namespace) -> Any:
    if args.env == "replay":
        from ..envs.replay import ReplayEnv

        if not args.env_path:
            raise ValueError("--env replay needs --env.path (an episode .npz or a LeRobot dataset directory)")
        return ReplayEnv.load(args.env_path, episode=args.env_episode)
    if args.env == "robot":
        from ..envs.robot import RobotEnv, make_so_follower

        robot = make_so_follower(
            args.robot_port, model=args.robot_model, left_port=args.robot_left_port, right_port=args.robot_right_port,
            robot_id=args.robot_id, cameras=parse_robot_cameras(args.robot_cameras),
            max_relative_target=args.robot_max_relative_target,
        )
        return RobotEnv(robot, fps=args.fps, task=args.task)
    from ..envs.fake import FakeEnv
    from .serve import parse_cameras

    cameras = None if args.env_cameras is None else [name.strip() for name in args.env_cameras.split(",") if name.strip()]
    size = None if args.env_image_size is None else next(iter(parse_cameras(f"x={args.env_image_size}").values()))
    return FakeEnv(
        args.env_layout, cameras=cameras, image_size=size, episode_steps=args.env_episode_steps, fps=args.fps,
        task=args.task, preset=args.env_task, keys=args.env_keys,
    )


def parse_robot_cameras(text: str) -> dict[str, Any]:
    """``front=0:480x640,wrist=/dev/video2:480x640`` as LeRobot ``OpenCVCameraConfig`` objects."""
    cameras: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, spec = item.partition("=")
        source, _, size = spec.rpartition(":")
        try:
            height, width = (int(n) for n in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad camera spec {item!r}: expected NAME=INDEX_OR_PATH:HxW, e.g. front=0:480x640") from None
        if not name or not source:
            raise ValueError(f"bad camera spec {item!r}: expected NAME=INDEX_OR_PATH:HxW, e.g. front=0:480x640")
        from lerobot.cameras.opencv import OpenCVCameraConfig

        cameras[name] = OpenCVCameraConfig(index_or_path=int(source) if source.isdigit() else source, width=width, height=height, fps=30)
    return cameras


@contextlib.contextmanager
def _server(args: argparse.Namespace, env: Any) -> Iterator[str]:
    """The server URL: ``--server``, or a local server with the built-in ``--policy.type``."""
    if args.server:
        if args.policy_type or args.policy_path:
            raise ValueError("give either --server or a local policy (--policy.type / --policy.path), not both")
        yield args.server
        return
    from ..server.background import BackgroundServer
    from .serve import policy_from_args

    if not (args.policy_type or args.policy_path):
        raise ValueError("give --server ws://host:port, or --policy.type / --policy.path to start a local server")
    if args.policy_type:  # a built-in policy shaped like the environment unless told otherwise
        if args.action_dim is None:
            args.action_dim = env.action_dim
        if args.state_dim is None:
            args.state_dim = env.action_dim
        if not args.cameras and env.camera_names:
            sizes = _camera_sizes(env)
            args.cameras = ",".join(f"{name}={height}x{width}" for name, (height, width) in sizes.items())
    quiet_local_server()
    with BackgroundServer(policy_from_args(args), host="127.0.0.1", api_key=args.api_key) as server:
        yield server.url


def quiet_local_server() -> None:
    """A server started for this command logs only warnings (unless --log-level debug): the live status line stays readable."""
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("policylink.server").setLevel(logging.WARNING)


def _camera_sizes(env: Any) -> dict[str, tuple[int, int]]:
    observation = env.reset()
    keys = getattr(env, "image_keys", None) or {name: f"observation.images.{name}" for name in env.camera_names}
    return {name: tuple(observation[keys[name]].shape[:2]) for name in env.camera_names}


@contextlib.contextmanager
def _live_status(executor: Any, period_s: float = 0.5) -> Iterator[None]:
    """Rewrite one status line on a terminal; print one every few seconds otherwise."""
    done = threading.Event()
    tty = sys.stdout.isatty()

    def show() -> None:
        while not done.wait(period_s if tty else 5.0):
            line = executor.status_line()
            print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", flush=True)

    thread = threading.Thread(target=show, name="policylink-status", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if tty:
            print(f"\r{executor.status_line()}\033[K", flush=True)


def _floats(text: str, flag: str, count: int) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise ValueError(f"{flag} takes {count} comma-separated numbers, got {text!r}")
    return values
