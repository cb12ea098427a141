"""``policylink eval``: run a policy in a simulator for many episodes and report how it did."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path
from typing import Any

from ._watch import Watchers, add_watch_flags
from .config import add_config_flags
from .run import add_image_codec_flags, add_rtc_flags, check_rtc_flags, quiet_local_server
from .serve import add_policy_flags

HELP = """\
Evaluate a policy in a gymnasium simulator (the [sim] extra): run N episodes,
K environments at a time, each its own client session of one server, then
print the success rate (with a 95% Wilson interval), return, episode length,
latency percentiles and throughput, and write results.json (plus MP4 videos
of the first --videos episodes) to --out.

The policy comes from --server (a running policylink or openpi server; with
--policy.path every client first sends a configure request), or, without
--server, from a local server started here: --policy.path (loaded through a
configure request, needs the [server] extra) or --policy.type (built-in).

Time is simulated in control steps: --sim-latency-steps K makes every chunk
arrive K steps after its observation, however fast the server really is, so
runs are reproducible and async execution is judged honestly. Episode i runs
from seed --seed + i: same seeds and the same policy give the same results,
whatever --num-envs is.
"""

EXAMPLES = """\
examples:
  policylink eval --env pusht --policy.type random --episodes 10 --num-envs 4
  policylink eval --server ws://gpu-box:8000 --env aloha --episodes 50 --num-envs 8 --videos 2 --out runs/act
  policylink eval --env pusht --policy.path ckpt/pretrained_model --mode async --sim-latency-steps 3
  policylink eval --env metaworld/reach-v3 --policy.type random --episodes 10
"""


def add_parser(subparsers: Any) -> None:
    from ..envs.sim import ALIASES, SIM_ENVS

    parser = subparsers.add_parser(
        "eval", help="evaluate a policy in simulation (PushT, ALOHA, SO-100, MetaWorld)", description=HELP, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(parser)
    parser.add_argument("--server", default=None, help="policy server URL (ws://host:port); default: start a local one")
    parser.add_argument(
        "--env", default="pusht", type=_env_name, metavar="NAME",
        help=f"simulator: {', '.join([*SIM_ENVS, *ALIASES])}, or metaworld/TASK (e.g. metaworld/reach-v3, "
             "metaworld/pick-place-v3; an unknown task gets the list) (default: pusht)",
    )
    parser.add_argument("--episodes", type=int, default=10, help="episodes to run (default: 10)")
    parser.add_argument("--num-envs", type=int, default=1, help="environments stepping concurrently (default: 1)")
    parser.add_argument("--seed", dest="eval_seed", type=int, default=0, help="seed of episode 0; episode i uses seed+i (default: 0)")
    parser.add_argument(
        "--env.obs_type", dest="env_obs_type", default=None, choices=["pixels_agent_pos", "environment_state_agent_pos"],
        help="pusht: camera image (default) or the block's key points (observation.environment_state)",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: the simulator's: PushT 300, ALOHA/SO-100 400, MetaWorld 500)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and videos (default: outputs/eval/<time>_<env>)")
    parser.add_argument("--videos", type=int, default=0, help="record MP4 videos of the first M episodes (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one chunk (default: 60)")
    add_image_codec_flags(parser)
    execution = parser.add_argument_group("chunk execution (in simulated time)")
    execution.add_argument("--mode", choices=["sync", "async"], default="sync", help="sync: infer, execute, infer again; async: ask for the next chunk while the current one runs (default: sync)")
    execution.add_argument("--sim-latency-steps", type=int, default=0, help="simulated inference delay in control steps (default: 0)")
    execution.add_argument("--n-action-steps", type=int, default=None, help="actions executed from each chunk (default: the policy's n_action_steps)")
    execution.add_argument("--async-threshold", type=float, default=0.5, help="async: ask for the next chunk when this fraction of the chunk is left (default: 0.5)")
    execution.add_argument("--merge", default="latest", choices=["latest", "rtc"],
                           help="latest: a chunk replaces the queue; rtc: real-time chunking, async only: each request carries the queued "
                                "actions and the delay (--sim-latency-steps), the new chunk is spliced in exactly where it arrives "
                                "(latest-only, with a warning, against a policy that cannot do it) (default: latest)")
    add_rtc_flags(execution)
    add_policy_flags(parser)
    add_watch_flags(parser)
    # Built-in policies take the simulator's action size unless told otherwise.
    parser.set_defaults(func=run, action_dim=None)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import EvalConfig, ExecutionConfig, evaluate, format_summary

    check_rtc_flags(args, args.mode)
    env_options = {}
    if args.env_obs_type:
        if args.env != "pusht":
            raise ValueError("--env.obs_type applies to --env pusht only")
        env_options["obs_type"] = args.env_obs_type
    config = EvalConfig(
        env=args.env,
        env_options=env_options,
        episodes=args.episodes,
        num_envs=args.num_envs,
        seed=args.eval_seed,
        max_steps=args.max_steps,
        execution=ExecutionConfig(
            mode=args.mode, sim_latency_steps=args.sim_latency_steps,
            n_action_steps=args.n_action_steps, async_threshold=args.async_threshold,
            merge=args.merge, rtc_horizon=args.rtc_request_horizon, rtc_guidance=args.rtc_request_guidance,
        ),
        videos=args.videos,
        out=args.out or Path("outputs") / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}_{args.env.replace('/', '-')}",
        policy_path=args.policy_path,
        configure={"device": args.device, "dtype": args.dtype, "task": args.policy_task, "rename_map": args.policy_rename_map},
        timeout=args.timeout,
        image_codec=args.image_codec,
        image_quality=args.image_quality,
    )
    if args.log_level != "debug":
        # Per-request and per-connection lines (K clients, a local server) would bury the progress bar.
        for name in ("policylink.server", "policylink.client", "websockets", "absl"):
            logging.getLogger(name).setLevel(logging.WARNING)
    client = {"command": "eval", "env": args.env, "mode": args.mode, "merge": args.merge, "episodes": args.episodes, "num_envs": args.num_envs}
    with _server(args) as url, Watchers(args, {"server": url, "client": client}) as watchers, _Progress(config.episodes, args.env, disabled=args.no_progress) as progress:
        report = evaluate(url, config, on_episode=progress.update, listeners=watchers.listeners)
        if watchers.recorder is not None:
            watchers.recorder.update_metadata(policy=report.policy, env=report.env_info, client={**client, "fps": report.env_info.get("fps")})
    print(format_summary(report.summary, f"policylink eval: {report.env_info.get('name', args.env)} with {report.policy.get('model_id')}"))
    print(f"results: {report.results_path}")
    return 0


class _server:
    """The server to evaluate against: ``--server``, or a local one started here."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.background: Any = None

    def __enter__(self) -> str:
        args = self.args
        if args.policy_path and args.policy_type:
            raise ValueError("give either --policy.path or --policy.type, not both")
        if args.server:
            if args.policy_type:
                raise ValueError("--policy.type builds a local server; with --server use --policy.path (or none)")
            return str(args.server)
        from ..server.background import BackgroundServer
        from ..server.engine import Engine
        from .serve import builtin_from_args, model_loader, rtc_support_from_args

        if args.policy_type:
            if args.action_dim is None:
                args.action_dim = _sim_action_dim(args.env)
            engine = Engine(builtin_from_args(args))
        elif args.policy_path:
            loader = model_loader(rtc_support_from_args(args), args.compile)
            if loader is None:
                raise ImportError("loading --policy.path locally needs the server extra: pip install 'policylink[server]'")
            engine = Engine(None, loader=loader)  # idle: every client configures it
        else:
            raise ValueError("nothing to evaluate: give --server URL, --policy.path DIR or --policy.type NAME")
        quiet_local_server()
        self.background = BackgroundServer(engine, host="127.0.0.1", port=0).start()
        return self.background.url

    def __exit__(self, *exc: object) -> None:
        if self.background is not None:
            self.background.stop()


def _env_name(value: str) -> str:
    """``--env``: a simulator's name, an alias, or ``metaworld/TASK`` (the task is checked when it is built)."""
    from ..envs.sim import check_sim_name

    try:
        return check_sim_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sim_action_dim(env: str) -> int:
    from ..envs.sim import make_sim_env

    sim = make_sim_env(env, max_episode_steps=1)
    try:
        return sim.action_dim
    finally:
        sim.close()


class _Progress:
    """A tqdm bar over episodes showing the running success rate (or nothing)."""

    def __init__(self, total: int, name: str, disabled: bool) -> None:
        self.bar: Any = None
        self.successes = 0
        self.done = 0
        self._lock = threading.Lock()  # workers report from their own threads
        if not disabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"eval {name}", unit="ep", dynamic_ncols=True)

    def update(self, result: Any) -> None:
        with self._lock:
            self.done += 1
            self.successes += bool(result.success)
            if self.bar is not None:
                self.bar.set_postfix(success=f"{self.successes}/{self.done}", refresh=False)
                self.bar.update(1)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
