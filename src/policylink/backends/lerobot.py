"""Serve LeRobot checkpoints (ACT, Diffusion, SmolVLA, pi0, ...) as policylink policies.

A checkpoint directory is what LeRobot's ``save_pretrained`` writes:
``config.json`` and ``model.safetensors``, plus the pre- and post-processor
pipelines (``policy_preprocessor.json``, ``policy_postprocessor.json`` and
their normalisation statistics) when the training run saved them. A training
run's ``checkpoints/<step>/`` directory works too (its ``pretrained_model/``
is used).

One request runs: observation mapping (:mod:`.obsmap`), conversion to
tensors on the device (images resized there to the policy's input size), the
checkpoint's own pre-processor (normalisation, batching, tokenisation), one
``predict_action_chunk`` call for the whole chunk, the post-processor
(un-normalisation), and a copy to host memory, which also waits for the
accelerator to finish.

torch and lerobot are imported lazily: this module is importable without
them, and fails with a clear message only when a checkpoint is loaded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..action_space import ActionSpace
from ..errors import RequestError
from ..rtc.request import RTC_KEY, SEED_KEY, RTCRequest, RTCSupport
from ..types import Feature, Observation, Policy, PolicyMetadata, Reply
from .obsmap import ENV_STATE, STATE, ObservationSpec, map_observation, parse_rename_map

__all__ = [
    "LeRobotPolicy", "load_policy", "load_from_request", "resolve_checkpoint", "resolve_device",
    "estimate_checkpoint_bytes", "import_runtime", "DTYPES", "COMPILE_MODES",
]

logger = logging.getLogger("policylink.server")

#: Mixed-precision modes accepted by ``--dtype`` (``float32`` means none).
DTYPES = ("float32", "bfloat16", "float16")
#: Policies whose ``predict_action_chunk`` reads an observation history the caller must fill.
_QUEUE_FED_TYPES = ("diffusion", "vqbet")
#: Of those, the policies whose clients' histories are stacked into one batch (VQ-BeT still runs one by one).
_HISTORY_BATCHED_TYPES = ("diffusion",)
#: Flow-matching policies whose sampling LeRobot's real-time-chunking guidance can steer.
RTC_TYPES = ("smolvla", "pi0", "pi05")
#: ``torch.compile`` modes accepted by ``--compile`` (``reduce-overhead`` adds CUDA graphs on a GPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
#: Per policy type, the network ``--compile`` compiles: the module every forward pass (or denoising step) runs.
_COMPILE_TARGETS = {
    "act": "model",
    "diffusion": "diffusion.unet",
    "smolvla": "model.vlm_with_expert",
    "pi0": "model.paligemma_with_expert",
    "pi05": "model.paligemma_with_expert",
}
#: Control rate announced when the checkpoint does not record one.
DEFAULT_FPS = 30.0
#: Action bounds from mean/std statistics (when a checkpoint has no min/max): mean ± this many std.
ACTION_STD_BOUND = 4.0


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory holding ``config.json``; raises :class:`RequestError` naming what is wrong."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise RequestError(f"policy path {str(path)!r} does not exist")
    if not directory.is_dir():
        raise RequestError(f"policy path {str(path)!r} is not a directory (expected a LeRobot checkpoint directory)")
    if not (directory / "config.json").is_file() and (directory / "pretrained_model" / "config.json").is_file():
        directory = directory / "pretrained_model"
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise RequestError(f"{str(path)!r} is not a LeRobot checkpoint: {name} missing")
    return directory.resolve()


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda, then mps, then cpu; checks that an explicit device exists."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RequestError(f"device {device!r} requested, but this server has no CUDA device")
        if index and (not index.isdigit() or int(index) >= count):
            raise RequestError(f"device {device!r} requested, but this server has {count} CUDA device(s)")
        return device
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise RequestError("device 'mps' requested, but MPS is not available on this server")
        return "mps"
    raise RequestError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto")


def load_policy(
    path: str | Path,
    *,
    device: str | None = "auto",
    dtype: str | None = None,
    task: str | None = None,
    rename_map: str | Mapping[str, str] | None = None,
    fps: float | None = None,
    rtc: RTCSupport | None = RTCSupport(),
    compile: str | None = None,
    control: ActionSpace | None = None,
) -> LeRobotPolicy:
    """Load a LeRobot checkpoint directory, warm it up, and return it ready to serve.

    ``dtype`` ``bfloat16``/``float16`` runs the model under autocast (weights
    stay float32; normalisation runs in float32). ``task`` is the prompt used
    when an observation carries none. ``rename_map`` maps client camera names
    to the policy's. ``rtc`` sets the real-time-chunking defaults of
    flow-matching policies (:data:`RTC_TYPES`; ``None`` turns it off).
    ``compile`` (one of :data:`COMPILE_MODES`) compiles the policy's network
    with ``torch.compile`` and warms it up for a batch of one and for larger
    batches (one graph with a dynamic batch size), which takes minutes.
    ``control`` is the policy's action space; ``None`` reads it from the
    checkpoint's ``policylink.json`` (joint/abs without one).
    Raises :class:`RequestError` for a missing or broken checkpoint, an
    unknown device, dtype or compile mode.
    """
    directory = resolve_checkpoint(path)
    if control is None:
        try:
            control = ActionSpace.from_checkpoint(directory)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    dtype = (dtype or "float32").lower()
    if dtype not in DTYPES:
        raise RequestError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    if compile is not None and compile not in COMPILE_MODES:
        raise RequestError(f"unknown compile mode {compile!r}; use one of {list(COMPILE_MODES)}")
    try:
        rename = parse_rename_map(rename_map)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    try:
        import torch  # noqa: F401
        from lerobot.configs.policies import PreTrainedConfig  # noqa: F401
    except ImportError as exc:
        raise RequestError(f"this server cannot load LeRobot checkpoints: {exc} (install policylink[server])") from None
    chosen = resolve_device(device)
    started = time.perf_counter()
    allocated_before = _device_allocated(chosen)
    try:
        parts = _load_parts(directory, chosen)
    except RequestError:
        raise
    except Exception as exc:  # lerobot/draccus/safetensors raise many types for a broken checkpoint
        raise RequestError(f"could not load checkpoint {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    policy = LeRobotPolicy(
        *parts, device=chosen, dtype=dtype, model_id=str(path), task=task, rename_map=rename,
        fps=fps if fps is not None else _recorded_fps(directory), rtc=rtc, control=control,
    )
    load_s = time.perf_counter() - started
    if compile is not None:
        _compile(policy, compile)
    warmup_ms = policy.warm_up()
    if allocated_before is not None:
        # What the cache's budget counts: the accelerator memory this model really holds after its warm-up.
        policy.memory_bytes = max(policy.memory_bytes, _device_allocated(chosen) - allocated_before)
    logger.info(
        "loaded %s checkpoint %s on %s (%s%s) in %.1f s; warm-up %.0f ms; chunk %s",
        policy.metadata.policy_type, directory, chosen, dtype, f", compiled: {compile}" if compile else "", load_s, warmup_ms,
        (policy.metadata.horizon, policy.metadata.action_dim),
    )
    return policy


def load_from_request(request: Mapping[str, Any], rtc: RTCSupport | None = RTCSupport(), compile: str | None = None) -> LeRobotPolicy:
    """The engine's loader for configure requests: ``policy_path``, ``device``, ``dtype``, ``rename_map``, ``fps``.

    ``rtc`` and ``compile`` are the server's settings (bind them with ``functools.partial``).
    """
    path = request.get("policy_path")
    if not path or not isinstance(path, str):
        raise RequestError("configure needs 'policy_path': the checkpoint directory on the server")
    fps = request.get("fps")
    return load_policy(
        path, device=request.get("device") or "auto", dtype=request.get("dtype"),
        rename_map=request.get("rename_map"), fps=float(fps) if fps is not None else None, rtc=rtc, compile=compile,
    )


def import_runtime() -> None:
    """Import torch and LeRobot's loading code now (a server calls this at start-up, not in a request)."""
    import torch  # noqa: F401
    from lerobot.configs.policies import PreTrainedConfig  # noqa: F401
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors  # noqa: F401


def estimate_checkpoint_bytes(request: Mapping[str, Any]) -> int:
    """Memory a configure request's checkpoint will take, from its weight files (0 when unknown).

    The model cache evicts idle models *before* loading so that this much fits its budget.
    """
    try:
        directory = resolve_checkpoint(str(request.get("policy_path") or ""))
    except RequestError:
        return 0  # the load itself will say what is wrong
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def _device_allocated(device: str) -> int | None:
    """Bytes allocated on a CUDA device now (``None`` elsewhere: there a model holds its weights' size)."""
    if not device.startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def _load_parts(directory: Path, device: str) -> tuple[Any, Any, Any, Any]:
    """Config, model (eval mode, on ``device``), pre- and post-processor."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    config = PreTrainedConfig.from_pretrained(str(directory))
    config.device = device
    config.pretrained_path = str(directory)
    model = get_policy_class(config.type).from_pretrained(str(directory), config=config)
    model.to(device).eval()
    device_override = {"device_processor": {"device": device}}
    if (directory / "policy_preprocessor.json").is_file() and (directory / "policy_postprocessor.json").is_file():
        pre, post = make_pre_post_processors(
            config, pretrained_path=str(directory),
            preprocessor_overrides=device_override, postprocessor_overrides={"device_processor": {"device": "cpu"}},
        )
    else:
        # Checkpoints from before LeRobot saved its pipelines: no statistics to normalise with.
        logger.warning("%s has no saved pre/post-processors: serving without normalisation", directory)
        pre, post = make_pre_post_processors(config, dataset_stats=None)
    return config, model, pre, post


def _compile(policy: LeRobotPolicy, mode: str) -> None:
    """Swap the policy's network (:data:`_COMPILE_TARGETS`) for its ``torch.compile`` form; the warm-up compiles it."""
    import torch

    path = _COMPILE_TARGETS.get(str(policy.config.type))
    if path is None:
        raise RequestError(f"--compile supports {sorted(_COMPILE_TARGETS)} policies, not {policy.config.type!r}")
    *parents, name = path.split(".")
    owner = policy.model
    for part in parents:
        owner = getattr(owner, part)
    # Automatic dynamic shapes: the warm-up's batch of two recompiles with the batch size (the only dimension that
    # changed) symbolic, so one graph serves every larger batch; image sizes and chunk lengths stay static.
    setattr(owner, name, torch.compile(getattr(owner, name), mode=mode))
    policy.compiled = mode


def _recorded_fps(directory: Path) -> float | None:
    """The control rate of the training environment, when the training run recorded it."""
    for candidate in (directory / "train_config.json", directory.parent / "train_config.json"):
        if candidate.is_file():
            try:
                env = json.loads(candidate.read_text()).get("env") or {}
                return float(env["fps"]) if env.get("fps") else None
            except (ValueError, OSError, TypeError):
                return None
    return None


class LeRobotPolicy(Policy):
    """A loaded LeRobot policy.

    The weights are shared by every client; per-client state (Diffusion's
    observation history, queued actions) lives in the objects that
    :meth:`session` returns. One forward pass runs at a time (a lock guards
    the model), so :attr:`thread_safe` is false.
    """

    thread_safe = False

    def __init__(
        self, config: Any, model: Any, preprocessor: Any, postprocessor: Any, *,
        device: str, dtype: str = "float32", model_id: str = "", task: str | None = None,
        rename_map: Mapping[str, str] | None = None, fps: float | None = None, rtc: RTCSupport | None = None,
        control: ActionSpace = ActionSpace(),
    ) -> None:
        self.config = config
        self.model = model
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.device = device
        self.dtype = dtype
        self.model_id = model_id or str(getattr(config, "pretrained_path", "lerobot"))
        self.default_task = task
        self.fps = fps
        self.control = control
        shapes = {key: tuple(feature.shape) for key, feature in config.input_features.items()}
        self.spec = ObservationSpec.from_feature_keys(shapes, rename_map)
        self.image_sizes = {key: (shape[-2], shape[-1]) for key, shape in shapes.items() if key in self.spec.cameras.values()}
        #: Guards the model: one forward pass at a time.
        self._lock = threading.Lock()
        #: Guards the pre-processor (tokenizers are not thread-safe); preparation may overlap a forward pass.
        self._prepare_lock = threading.Lock()
        #: The CUDA stream requests are prepared on (copies, resizing, normalisation), beside the model's.
        self._preparation_stream: Any = None
        self._state: dict[str, Any] = {}
        self._metadata: PolicyMetadata | None = None
        #: The ``torch.compile`` mode the network runs under (``None``: eager).
        self.compiled: str | None = None
        #: Memory the model holds: its weights and buffers (on CUDA, :func:`load_policy` raises it to what it allocated).
        self.memory_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        #: Real-time-chunking defaults, when this policy can be steered (flow matching) and the server allows it.
        self.rtc = rtc if rtc is not None and config.type in RTC_TYPES and hasattr(config, "rtc_config") else None
        if self.rtc is not None:
            from ..rtc.guidance import install

            install(model, self.rtc)

    # -- Policy API -------------------------------------------------------

    @property
    def metadata(self) -> PolicyMetadata:
        if self._metadata is None:
            raise RuntimeError("the policy has not been warmed up yet")
        return self._metadata

    def infer(self, obs: Observation) -> Reply:
        return self.run(obs, self._state)

    def reset(self) -> None:
        self._state.clear()

    def session(self) -> LeRobotSession:
        return LeRobotSession(self)

    def close(self) -> None:
        with self._lock:
            self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # -- running ----------------------------------------------------------

    def warm_up(self) -> float:
        """Run one inference on a blank observation (and learn the chunk length); returns ms."""
        started = time.perf_counter()
        obs: Observation = {key: np.zeros((*size, 3), np.uint8) for key, size in self.image_sizes.items()}
        if self.spec.state_dim is not None:
            obs[STATE] = np.zeros(self.spec.state_dim, np.float32)
        if self.spec.env_state_dim is not None:
            obs[ENV_STATE] = np.zeros(self.spec.env_state_dim, np.float32)
        actions = self.run(obs, {})["actions"]
        self._metadata = self._build_metadata(horizon=actions.shape[0], action_dim=actions.shape[1])
        if self.compiled and self._batchable():
            # A batch of two compiles the dynamic-batch graph that every larger batch reuses, before a client waits on it.
            self.infer_batch([LeRobotSession(self), LeRobotSession(self)], [obs, obs])
        return (time.perf_counter() - started) * 1e3

    def run(self, obs: Observation, state: dict[str, Any]) -> Reply:
        """Infer with per-client ``state``; returns ``{"actions": (horizon, action_dim) float32}``."""
        return self._infer_prepared([self.prepare(self, obs)], [state])[0]

    # -- batching across clients ------------------------------------------

    def batch_key(self, obs: Observation) -> Any:
        """Batchable policies batch any requests (inputs are resized to one size); the others never batch."""
        return None if not self._batchable() else ("lerobot", self.model_id)

    def _batchable(self) -> bool:
        # ACT and the flow-matching VLAs predict from the current observation alone; Diffusion reads a per-client
        # history, which is stacked across the batch; VQ-BeT (a history too, and categorical sampling) runs one by one.
        if self.config.type in _QUEUE_FED_TYPES:
            return self.config.type in _HISTORY_BATCHED_TYPES
        return not hasattr(self.model, "_queues") or self.config.type in RTC_TYPES

    def infer_batch(self, sessions: Any, observations: Any) -> list[Reply]:
        """One forward pass for several clients' observations (:meth:`prepare`, then :meth:`infer_prepared`)."""
        return self.infer_prepared(sessions, [self.prepare(session, obs) for session, obs in zip(sessions, observations)])

    def prepare(self, session: Any, obs: Observation) -> _Prepared:
        """The host-side half of a request: mapping, tensors on the device, the checkpoint's pre-processor.

        Runs on the batch scheduler's preparation thread while the model computes the batch before (on
        CUDA, on a stream of its own, images copied through page-locked memory); touches no client state.
        """
        stripped, rtc, seed = _take_sampling_fields(obs)
        mapped = map_observation(stripped, self.spec, default_task=self.default_task)
        with self._prepare_lock, self._grad_mode(), self._on_preparation_stream():
            batch = self._preprocess(mapped)
            ready = self._record_ready()
        return _Prepared(obs, batch, rtc, seed, ready)

    def infer_prepared(self, sessions: Any, prepared: Any) -> list[Reply]:
        """One forward pass for several prepared requests; ``prepared[i]`` came from ``sessions[i]``.

        Each client's real-time-chunking fields and noise seed apply to its own row; for Diffusion each
        client's own observation history (held by its session) is updated and stacked into the batch.
        """
        states = [self._session_state(session) for session in sessions]
        if any(state is None for state in states):
            return [session.infer(item.obs) for session, item in zip(sessions, prepared)]
        if len(prepared) > 1 and not self._batchable():
            return [self._infer_prepared([item], [state])[0] for item, state in zip(prepared, states)]
        return self._infer_prepared(list(prepared), states)

    def _infer_prepared(self, prepared: list[_Prepared], states: list[dict[str, Any]]) -> list[Reply]:
        """The device half: one forward pass for the rows, the post-processor, one copy of the batch to the host."""
        seeds = [item.seed for item in prepared]
        with self._lock, self._grad_mode(), _DeviceTimer(self.device) as timer:
            if self.model is None:
                raise RuntimeError(f"model {self.model_id} was unloaded")
            batches = [self._when_ready(item) for item in prepared]
            with self._autocast():
                if self.config.type in _QUEUE_FED_TYPES:
                    actions = self._predict_from_histories(batches, states, seeds)
                elif len(batches) == 1:
                    actions = self._predict_chunk(batches[0], states[0], self._sampling_kwargs([prepared[0].rtc], seeds))
                else:
                    kwargs = self._sampling_kwargs([item.rtc for item in prepared], seeds)
                    actions = self.model.predict_action_chunk(_concat(batches), **kwargs)
            chunks = self._postprocess(actions)
        return [timer.stamp({"actions": chunk}) for chunk in chunks]

    def _on_preparation_stream(self) -> Any:
        """On CUDA, a context that queues the preparation's device work on its own stream."""
        if not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        import torch

        if self._preparation_stream is None:
            self._preparation_stream = torch.cuda.Stream(device=self.device)
        return torch.cuda.stream(self._preparation_stream)

    def _record_ready(self) -> Any:
        """A CUDA event marking the end of the preparation's device work (``None`` elsewhere)."""
        if self._preparation_stream is None:
            return None
        import torch

        event = torch.cuda.Event()
        event.record(self._preparation_stream)
        return event

    def _when_ready(self, prepared: _Prepared) -> dict[str, Any]:
        """The prepared tensors, with the model's stream made to wait for the preparation stream's copies."""
        if prepared.ready is not None:
            import torch

            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(prepared.ready)
            for value in prepared.batch.values():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    # Allocated on the preparation stream, read on this one: not reused before this stream is done.
                    value.record_stream(stream)
        return prepared.batch

    def _session_state(self, session: Any) -> dict[str, Any] | None:
        """The per-client state a batch entry's session owns (``None`` for a session of another policy)."""
        if session is self:
            return self._state
        if isinstance(session, LeRobotSession) and session.policy is self:
            return session._state
        return None

    def _predict_from_histories(self, batches: list[dict[str, Any]], states: list[dict[str, Any]], seeds: list[int | None]) -> Any:
        """One chunk per client from its observation history (Diffusion, VQ-BeT), all clients in one model call.

        Each client's history gets its new observation the way ``select_action`` adds it (cameras stacked,
        ``populate_queues``); the histories are then joined step by step along the batch dimension (request
        order) and swapped into the model for one ``predict_action_chunk``. A client's history is committed to
        its state only once the call succeeded, so a failed batch retried one by one appends nothing twice.
        """
        import torch
        from lerobot.policies.utils import populate_queues
        from lerobot.utils.constants import OBS_IMAGES

        model = self.model
        histories: list[dict[str, Any]] = []
        saved = model._queues
        try:
            for index, (batch, state) in enumerate(zip(batches, states)):
                batch = dict(batch)
                if self.config.image_features:
                    batch[OBS_IMAGES] = torch.stack([batch[key] for key in self.config.image_features], dim=-4)
                batches[index] = batch
                if "queues" in state:
                    queues = {key: collections.deque(queue, maxlen=queue.maxlen) for key, queue in state["queues"].items()}
                else:
                    model.reset()  # fresh, empty history for this client
                    queues = model._queues
                histories.append(populate_queues(queues, batch))
            if len(histories) == 1:
                model._queues = histories[0]
            else:
                # Step i of the joined history: step i of every client's history, concatenated in request order.
                model._queues = {
                    key: collections.deque((torch.cat(steps, dim=0) for steps in zip(*(h[key] for h in histories))), maxlen=queue.maxlen)
                    for key, queue in histories[0].items() if key in batches[0]
                }
            if self.config.type == "diffusion" and any(seed is not None for seed in seeds):
                actions = self._sample_diffusion(batches[0], seeds)
            else:
                actions = model.predict_action_chunk(batches[0])
        finally:
            model._queues = saved
        for state, queues in zip(states, histories):
            state["queues"] = queues
        return actions

    def _sample_diffusion(self, batch: dict[str, Any], seeds: list[int | None]) -> Any:
        """Diffusion's ``predict_action_chunk`` with per-row randomness: one CPU generator per row.

        A seeded row's generator is seeded with its seed, an unseeded row's from torch's global generator.
        Each row's initial noise comes from its generator, and LeRobot's ``conditional_sample`` passes the
        list of generators on to the noise scheduler, which draws each row's per-step noise (DDPM; DDIM with
        eta > 0) from that row's generator. So a row gets the same chunk in a batch as alone.
        """
        import torch

        model = self.model
        diffusion = model.diffusion
        config = diffusion.config
        # What predict_action_chunk and generate_actions do, with the generators passed on to the sampler.
        history = {key: torch.stack(list(model._queues[key]), dim=1) for key in batch if key in model._queues}
        generators = [
            torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            for seed in seeds
        ]
        dtype = next(diffusion.parameters()).dtype
        shape = (1, int(config.horizon), int(config.action_feature.shape[0]))
        noise = torch.cat([torch.randn(shape, generator=generator, dtype=dtype) for generator in generators]).to(self.device)
        global_cond = diffusion._prepare_global_conditioning(history)
        sample = diffusion.conditional_sample(len(seeds), global_cond=global_cond, generator=generators, noise=noise)
        start = int(config.n_obs_steps) - 1
        return sample[:, start : start + int(config.n_action_steps)]

    def _grad_mode(self) -> Any:
        """``inference_mode``, except for policies that may be steered: RTC guidance needs autograd."""
        import torch

        return torch.no_grad() if self.rtc is not None else torch.inference_mode()

    def _sampling_kwargs(self, requests: list[RTCRequest | None], seeds: list[int | None]) -> dict[str, Any]:
        """``predict_action_chunk`` arguments for a batch: noise from the seeds, RTC guidance in model space."""
        kwargs: dict[str, Any] = {}
        if self.config.type in RTC_TYPES and any(seed is not None for seed in seeds):
            kwargs["noise"] = self._noise(seeds)
        if self.rtc is not None and any(request is not None for request in requests):
            from ..rtc.guidance import build_guidance

            targets = [None if request is None else self._normalized_actions(request.prefix) for request in requests]
            guidance = build_guidance(requests, targets, self.rtc, int(self.config.chunk_size), int(self.config.max_action_dim), self.device)
            # LeRobot's RTC arguments; the batch-aware processor reads everything from `inference_delay`.
            kwargs.update(inference_delay=guidance, prev_chunk_left_over=None, execution_horizon=None)
        return kwargs

    def _noise(self, seeds: list[int | None]) -> Any:
        """The sampling noise for a batch: each seeded row from its own generator, the others fresh."""
        import torch

        shape = (int(self.config.chunk_size), int(self.config.max_action_dim))
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.randn(shape) for seed in seeds]
        return torch.stack(rows).to(self.device)

    def _normalized_actions(self, actions: np.ndarray) -> Any:
        """Actions in the model's space: normalised with the checkpoint's action statistics (the post-processor's)."""
        import torch

        tensor = torch.tensor(np.asarray(actions, np.float32))
        for step in getattr(self.postprocessor, "steps", ()):
            if hasattr(step, "_normalize_action") and "action" in (getattr(step, "stats", None) or {}):
                return step._normalize_action(tensor, inverse=False)
        return tensor

    def _preprocess(self, mapped: Any) -> dict[str, Any]:
        """Tensors on the device through the checkpoint's pre-processor (batch of one). Holds the preparation lock."""
        if self.model is None:
            raise RuntimeError(f"model {self.model_id} was unloaded")
        batch = self.preprocessor(self._to_batch(mapped))
        batch.pop("action", None)  # the pipeline adds an empty action slot; history queues would take it
        return batch

    def _postprocess(self, actions: Any) -> list[np.ndarray]:
        """Un-normalise and copy to the host; one ``(horizon, action_dim)`` array per batch row."""
        actions = self.postprocessor(actions.float())
        # .cpu() waits for the accelerator: the engine's infer_ms covers the real work.
        chunk = actions.float().cpu().numpy()
        if chunk.ndim == 2:
            chunk = chunk[None]
        return [np.ascontiguousarray(row, dtype=np.float32) for row in chunk]

    def _to_batch(self, mapped: Any) -> dict[str, Any]:
        """Unbatched tensors on the device; images float 3xHxW in [0, 1] at the policy's size."""
        batch: dict[str, Any] = {}
        if mapped.state is not None:
            batch[STATE] = self._to_device(mapped.state)
        if mapped.env_state is not None:
            batch[ENV_STATE] = self._to_device(mapped.env_state)
        for key, image in mapped.images.items():
            batch[key] = self._image_tensor(image, self.image_sizes[key])
        batch["task"] = mapped.task if mapped.task is not None else ""
        return batch

    def _to_device(self, array: np.ndarray) -> Any:
        """``array`` as a tensor on the device, in memory of its own (decoded messages are read-only views)."""
        import torch

        if self.device.startswith("cuda"):
            # One copy into page-locked memory, then an asynchronous copy on the current (preparation) stream.
            pinned = torch.empty(array.shape, dtype=_torch_dtype(array.dtype), pin_memory=True)
            pinned.numpy()[...] = array
            return pinned.to(self.device, non_blocking=True)
        return torch.from_numpy(np.array(array, copy=True, order="C")).to(self.device)

    def _image_tensor(self, image: np.ndarray, size: tuple[int, int]) -> Any:
        import torch
        import torch.nn.functional as F

        # Move the compact uint8 frame to the device first, then convert and resize there.
        tensor = self._to_device(image)
        if tensor.dtype == torch.uint8:
            tensor = tensor.permute(2, 0, 1).float().div_(255.0)
        if tuple(tensor.shape[-2:]) != tuple(size):
            tensor = F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            tensor = tensor.clamp_(0.0, 1.0)
        return tensor

    def _predict_chunk(self, batch: dict[str, Any], state: dict[str, Any], kwargs: Mapping[str, Any] | None = None) -> Any:
        """One ``predict_action_chunk`` call with this client's queues swapped in (policies that read no history)."""
        model = self.model
        has_queues = hasattr(model, "_queues")
        if has_queues:
            if "queues" not in state:
                model.reset()  # fresh, empty queues for this client
                state["queues"] = model._queues
            model._queues = state["queues"]
        actions = model.predict_action_chunk(batch, **(kwargs or {}))
        if has_queues:
            state["queues"] = model._queues
        return actions

    def _autocast(self) -> Any:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device.split(":")[0], dtype=getattr(torch, self.dtype))

    def _build_metadata(self, horizon: int, action_dim: int) -> PolicyMetadata:
        features: dict[str, Feature] = {}
        if self.spec.state_dim is not None:
            features[STATE] = Feature((self.spec.state_dim,), "float32")
        if self.spec.env_state_dim is not None:
            features[ENV_STATE] = Feature((self.spec.env_state_dim,), "float32")
        for key, (height, width) in self.image_sizes.items():
            features[key] = Feature((height, width, 3), "uint8")
        n_action_steps = getattr(self.config, "n_action_steps", None)
        notes = [f"LeRobot {self.config.type} checkpoint on {self.device} ({self.dtype})"]
        notes.append("images: HxWx3 uint8 at any size (resized by the server) or 3xHxW float in [0, 1]")
        if self.fps is None:
            notes.append(f"fps not recorded in the checkpoint; {DEFAULT_FPS:g} assumed")
        low, high = self._action_range(action_dim)
        if low is not None:
            notes.append("action bounds from the checkpoint's statistics")
        return PolicyMetadata(
            action_low=low,
            action_high=high,
            action_dim=action_dim,
            horizon=horizon,
            fps=self.fps if self.fps is not None else DEFAULT_FPS,
            input_features=features,
            camera_names=tuple(self.spec.cameras),
            model_id=self.model_id,
            policy_type=str(self.config.type),
            n_action_steps=min(int(n_action_steps), horizon) if n_action_steps else horizon,
            description="; ".join(notes),
            rtc=self.rtc.within(horizon) if self.rtc is not None else None,
            control=self.control,
        )


    def _action_range(self, action_dim: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """The training data's action range from the post-processor's statistics: min/max, else mean ± 4 std."""
        for step in getattr(self.postprocessor, "steps", ()):
            stats = (getattr(step, "stats", None) or {}).get("action")
            if not stats:
                continue
            if "min" in stats and "max" in stats:
                low, high = _as_floats(stats["min"]), _as_floats(stats["max"])
            elif "mean" in stats and "std" in stats:
                mean, std = _as_floats(stats["mean"]), _as_floats(stats["std"])
                low = tuple(m - ACTION_STD_BOUND * s for m, s in zip(mean, std))
                high = tuple(m + ACTION_STD_BOUND * s for m, s in zip(mean, std))
            else:
                continue
            if len(low) == len(high) == action_dim:
                return low, high
        return None, None


def _as_floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(getattr(value, "cpu", lambda: value)(), dtype=np.float64).reshape(-1))


class LeRobotSession(Policy):
    """One client's view of a :class:`LeRobotPolicy`: shared weights, its own history."""

    thread_safe = False

    def __init__(self, policy: LeRobotPolicy) -> None:
        self.policy = policy
        self._state: dict[str, Any] = {}

    @property
    def metadata(self) -> PolicyMetadata:
        return self.policy.metadata

    def infer(self, obs: Observation) -> Reply:
        return self.policy.run(obs, self._state)

    def reset(self) -> None:
        self._state.clear()

    def session(self) -> LeRobotSession:
        return LeRobotSession(self.policy)


class _DeviceTimer:
    """``gpu_ms``: the device time of one forward pass, from CUDA events (nothing on other devices).

    ``infer_ms`` already covers the device's work (the copy to the host waits
    for it); ``gpu_ms`` says how much of it the accelerator was busy.
    """

    def __init__(self, device: str) -> None:
        self.events: tuple[Any, Any] | None = None
        if device.startswith("cuda"):
            import torch

            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def __enter__(self) -> _DeviceTimer:
        if self.events is not None:
            self.events[0].record()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.events is not None:
            self.events[1].record()

    def stamp(self, reply: Reply) -> Reply:
        """``reply`` with ``server_timing.gpu_ms`` when timed on CUDA (the copy to the host has synchronised)."""
        if self.events is not None:
            self.events[1].synchronize()
            reply["server_timing"] = {"gpu_ms": float(self.events[0].elapsed_time(self.events[1]))}
        return reply


@dataclasses.dataclass
class _Prepared:
    """One request made ready for a batch: its pre-processed batch of one, on the device, and its sampling fields."""

    #: The observation as received (for a session of another policy, which infers it itself).
    obs: Observation
    batch: dict[str, Any]
    rtc: RTCRequest | None
    seed: int | None
    #: On CUDA, the event after which the preparation stream's copies are done.
    ready: Any = None


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _take_sampling_fields(obs: Observation) -> tuple[Observation, RTCRequest | None, int | None]:
    """The observation without the engine's checked RTC fields and noise seed, and those two."""
    if RTC_KEY not in obs and SEED_KEY not in obs:
        return obs, None, None
    obs = dict(obs)
    return obs, obs.pop(RTC_KEY, None), obs.pop(SEED_KEY, None)


def _concat(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Join pre-processed batches of one along the batch dimension (lists, e.g. tasks, are joined)."""
    import torch

    joined: dict[str, Any] = {}
    for key, first in batches[0].items():
        values = [batch[key] for batch in batches]
        if isinstance(first, torch.Tensor):
            joined[key] = torch.cat(_padded_tokens(values) if key.endswith((".tokens", ".attention_mask")) else values, dim=0)
        elif isinstance(first, list):
            joined[key] = [item for value in values for item in value]
        else:
            joined[key] = first
    return joined


def _padded_tokens(values: list[Any]) -> list[Any]:
    """Prompts tokenised one by one (padded to their own length) right-padded to the longest; the mask hides the padding."""
    import torch.nn.functional as F

    longest = max(value.shape[-1] for value in values)
    return [F.pad(value, (0, longest - value.shape[-1])) for value in values]
