"""Evaluate a served policy over many simulated episodes, several environments at once.

Each of the ``num_envs`` workers owns one simulator and one
:class:`~policylink.client.PolicyClient`, i.e. its own server session: the
server keeps each session's policy state (observation history, action queue)
apart, exactly as for several robots, and may batch the sessions' requests
into one forward pass where the policy allows it. Workers take the next
episode index from a shared counter; episode ``i`` always runs from seed
``seed + i`` with a freshly reset policy session, so its result does not
depend on which worker ran it, or on how many there were.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..client import PolicyClient
from ..envs.sim import GymEnv, make_sim_env
from ..runtime.events import LoopListener
from ..types import PolicyMetadata
from .rollout import EpisodeResult, ExecutionConfig, run_episode
from .summary import summarize
from .video import VideoWriter

__all__ = ["EvalConfig", "EvalReport", "evaluate", "RESULTS_SCHEMA_VERSION"]

logger = logging.getLogger("policylink.eval")

RESULTS_SCHEMA_VERSION = 1


@dataclasses.dataclass
class EvalConfig:
    """What to evaluate and how."""

    env: str = "pusht"
    episodes: int = 10
    num_envs: int = 1
    seed: int = 0
    #: Steps per episode (``None``: the simulator's own limit).
    max_steps: int | None = None
    execution: ExecutionConfig = dataclasses.field(default_factory=ExecutionConfig)
    #: Record MP4 videos of the first this-many episodes.
    videos: int = 0
    out: Path | None = None
    #: Options for the simulator's adapter (``obs_type``, ``image_size``...).
    env_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Sent as a configure request by every client when set.
    policy_path: str | None = None
    #: Extra fields of that configure request (``device``, ``dtype``, ``task``, ``rename_map``).
    configure: dict[str, Any] = dataclasses.field(default_factory=dict)
    timeout: float = 60.0
    #: How the clients send camera frames: ``raw`` or ``jpeg`` (at ``image_quality``).
    image_codec: str = "raw"
    image_quality: int = 90

    def __post_init__(self) -> None:
        if self.episodes <= 0:
            raise ValueError(f"episodes must be positive, got {self.episodes}")
        if self.num_envs <= 0:
            raise ValueError(f"num_envs must be positive, got {self.num_envs}")
        if self.videos < 0:
            raise ValueError(f"videos must be >= 0, got {self.videos}")
        if self.videos and self.out is None:
            raise ValueError("videos need an output folder (--out)")


@dataclasses.dataclass
class EvalReport:
    """Everything an evaluation produced."""

    config: EvalConfig
    episodes: list[EpisodeResult]
    summary: dict[str, Any]
    policy: dict[str, Any]
    env_info: dict[str, Any]
    results_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        execution = dataclasses.asdict(self.config.execution)
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "policylink_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "env": self.env_info,
            "policy": self.policy,
            "config": {
                "episodes": self.config.episodes,
                "num_envs": self.config.num_envs,
                "seed": self.config.seed,
                "seeds": [result.seed for result in self.episodes],
                "videos": self.config.videos,
                "policy_path": self.config.policy_path,
                **execution,
                # As asked (None: the simulator's limit, in env.max_episode_steps).
                "max_steps": self.config.max_steps,
            },
            "summary": self.summary,
            "episodes": [result.to_dict() for result in self.episodes],
        }


EnvFactory = Callable[[], GymEnv]


def evaluate(
    server_url: str,
    config: EvalConfig,
    on_episode: Callable[[EpisodeResult], None] | None = None,
    env_factory: EnvFactory | None = None,
    listeners: Sequence[LoopListener] = (),
) -> EvalReport:
    """Run ``config.episodes`` episodes against the server at ``server_url``.

    ``on_episode`` is called (from a worker thread) after each episode, e.g.
    to advance a progress bar. ``env_factory`` overrides how simulators are
    built (default: :func:`~policylink.envs.sim.make_sim_env`). ``listeners``
    (monitor, recorder) receive every episode's events, from the worker threads.
    """
    options = dict(config.env_options)
    if config.max_steps is not None:
        options["max_episode_steps"] = config.max_steps
    factory = env_factory or (lambda: make_sim_env(config.env, **options))
    workers = min(config.num_envs, config.episodes)
    run = _Run(server_url, config, factory, on_episode)
    run.listeners = listeners
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="eval-env") as pool:
        futures = [pool.submit(run.worker, n) for n in range(workers)]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            run.stop.set()  # the other workers finish their episode and quit
            raise
    wall_s = time.perf_counter() - started
    results = sorted(run.results, key=lambda result: result.index)
    report = EvalReport(config, results, summarize(results, wall_s), run.policy_info, run.env_info)
    if config.out is not None:
        report.results_path = write_results(report, config.out)
    return report


def write_results(report: EvalReport, out: Path) -> Path:
    """Write ``results.json`` into ``out``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


class _Run:
    """State shared by the workers of one evaluation."""

    def __init__(self, url: str, config: EvalConfig, factory: EnvFactory, on_episode: Callable[[EpisodeResult], None] | None) -> None:
        self.url = url
        self.config = config
        self.factory = factory
        self.on_episode = on_episode
        self.stop = threading.Event()
        self.listeners: Sequence[LoopListener] = ()
        self.results: list[EpisodeResult] = []
        self.policy_info: dict[str, Any] = {}
        self.env_info: dict[str, Any] = {}
        self._indices = itertools.count()
        self._lock = threading.Lock()
        self._rtc_warned = False

    def _rtc_unsupported(self) -> None:
        """Say once per evaluation (not per episode or worker) that ``merge="rtc"`` falls back."""
        with self._lock:
            warn, self._rtc_warned = not self._rtc_warned, True
        if warn:
            logger.warning("the server's policy cannot do real-time chunking; merging latest-only")

    def next_index(self) -> int | None:
        with self._lock:
            index = next(self._indices)
        return index if index < self.config.episodes and not self.stop.is_set() else None

    def worker(self, number: int) -> None:
        config = self.config
        env = self.factory()
        client = PolicyClient(self.url, timeout=config.timeout, image_codec=config.image_codec, quality=config.image_quality)
        try:
            metadata = self._connect(client, env)
            # openpi servers know no commands (no per-episode reset).
            policylink_server = client.speaks_policylink
            execution = dataclasses.replace(config.execution, max_steps=config.max_steps or env.max_episode_steps)
            if execution.n_action_steps is None and metadata is not None:
                execution = dataclasses.replace(execution, n_action_steps=metadata.n_action_steps or metadata.horizon)
            if execution.merge == "rtc" and getattr(metadata, "rtc", None) is None:
                self._rtc_unsupported()
                execution = dataclasses.replace(execution, merge="latest", rtc_horizon=None, rtc_guidance=None)
            if number == 0:
                self._describe(metadata, client, env, execution)
            while (index := self.next_index()) is not None:
                # Frames go to the encoder as they are rendered: an episode's video is never held in memory.
                video = self._video(index, env.fps)
                grab = (lambda video=video: video.append(env.render())) if video is not None else None
                try:
                    result = run_episode(
                        env, client.infer, execution, index, config.seed + index, on_frame=grab,
                        reset=client.reset if policylink_server else None, stop=self.stop, listeners=self.listeners,
                        metadata=metadata,
                    )
                except BaseException:
                    _discard(video)
                    raise
                if result.interrupted:
                    _discard(video)  # as before: an unfinished episode leaves no video
                    return
                if video is not None and config.out is not None and (path := video.close()) is not None:
                    result.video = str(path.relative_to(config.out))
                with self._lock:
                    self.results.append(result)
                if self.on_episode is not None:
                    self.on_episode(result)
        finally:
            client.close()
            env.close()

    def _video(self, index: int, fps: float) -> VideoWriter | None:
        """The streaming writer for episode ``index``; ``None`` (nothing rendered) when it is not recorded."""
        config = self.config
        if index >= config.videos or config.out is None:
            return None
        return VideoWriter(config.out / "videos" / f"episode_{index:04d}.mp4", fps)

    def _connect(self, client: PolicyClient, env: GymEnv) -> PolicyMetadata | None:
        """Configure the model if asked; the policy's metadata (``None`` from a server that sends none)."""
        config = self.config
        if config.policy_path:
            options = {key: value for key, value in config.configure.items() if value not in (None, "")}
            metadata: PolicyMetadata | None = client.configure(config.policy_path, **options)
        elif client.server_metadata.get("status") == "idle":
            raise RuntimeError(f"the server at {self.url} has no model loaded; give --policy.path to configure one")
        else:
            metadata = client.metadata
        if metadata is not None and metadata.action_dim != env.action_dim:
            raise ValueError(
                f"the policy {metadata.model_id} outputs {metadata.action_dim} values per action, "
                f"but {env.name} takes {env.action_dim}"
            )
        return metadata

    def _describe(self, metadata: PolicyMetadata | None, client: PolicyClient, env: GymEnv, execution: ExecutionConfig) -> None:
        if metadata is not None:
            self.policy_info = {**metadata.to_dict(), "server": self.url}
        else:
            frame = client.server_metadata
            self.policy_info = {"model_id": "unknown", "server": self.url, **{k: _jsonable(v) for k, v in frame.items()}}
        self.env_info = {
            "name": env.name,
            "requested": self.config.env,
            "options": {key: _jsonable(value) for key, value in self.config.env_options.items()},
            "action_dim": env.action_dim,
            "fps": env.fps,
            "cameras": list(env.camera_names),
            "max_episode_steps": execution.max_steps,
            "n_action_steps": execution.n_action_steps,
        }


def _discard(video: VideoWriter | None) -> None:
    """Delete an unfinished episode's partial video; a failure here must not hide the episode's own error."""
    if video is None:
        return
    try:
        video.discard()
    except Exception:
        logger.exception("could not remove the partial video %s", video.path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return str(value)
