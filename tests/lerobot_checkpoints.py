"""Small real LeRobot checkpoints for the tests, built once per test session.

Each checkpoint is a real ACT or Diffusion policy with random weights and
made-up dataset statistics, saved with LeRobot's own ``save_pretrained`` and
its pre/post-processor pipelines' ``save_pretrained``: exactly the files a
training run writes. Nothing is downloaded (ACT's ImageNet backbone weights
are switched off; the VLAs' tokenizers are built here).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")

from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.act.configuration_act import ACTConfig  # noqa: E402
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig  # noqa: E402
from lerobot.policies.factory import get_policy_class, make_pre_post_processors  # noqa: E402

torch.set_num_threads(2)

#: Built checkpoints, by name: shared by every test module of the session.
_BUILT: dict[str, Path] = {}


def dataset_stats(state_dim: int, action_dim: int, cameras: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Statistics far from (0, 1), so that a missing normalisation changes the actions a lot."""
    stats = {
        "observation.state": _moments(torch.linspace(-2.0, 2.0, state_dim), torch.full((state_dim,), 3.0)),
        "action": _moments(torch.arange(action_dim, dtype=torch.float32) * 5.0, torch.full((action_dim,), 10.0)),
    }
    for name in cameras:
        stats[f"observation.images.{name}"] = _moments(torch.full((3, 1, 1), 0.4), torch.full((3, 1, 1), 0.25))
    return stats


def _moments(mean: Any, std: Any) -> dict[str, Any]:
    """Mean/std (ACT) and min/max (Diffusion's state and action) of a made-up distribution."""
    return {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std}


def features(state_dim: int, action_dim: int, cameras: Mapping[str, tuple[int, int]]) -> tuple[dict, dict]:
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (state_dim,))}
    for name, (height, width) in cameras.items():
        inputs[f"observation.images.{name}"] = PolicyFeature(FeatureType.VISUAL, (3, height, width))
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (action_dim,))}
    return inputs, outputs


def act_config(state_dim: int = 6, action_dim: int = 6, cameras: Mapping[str, tuple[int, int]] | None = None, chunk: int = 16) -> ACTConfig:
    inputs, outputs = features(state_dim, action_dim, cameras if cameras is not None else {"front": (48, 64)})
    return ACTConfig(
        input_features=inputs, output_features=outputs, device="cpu",
        chunk_size=chunk, n_action_steps=chunk,
        dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
        n_vae_encoder_layers=1, latent_dim=8,
        pretrained_backbone_weights=None,  # the default downloads ImageNet weights
    )


def diffusion_config(state_dim: int = 6, action_dim: int = 6, cameras: Mapping[str, tuple[int, int]] | None = None) -> DiffusionConfig:
    inputs, outputs = features(state_dim, action_dim, cameras if cameras is not None else {"front": (32, 32)})
    return DiffusionConfig(
        input_features=inputs, output_features=outputs, device="cpu",
        n_obs_steps=2, horizon=16, n_action_steps=8,
        down_dims=(16, 32), kernel_size=3, n_groups=4, diffusion_step_embed_dim=16,
        spatial_softmax_num_keypoints=8, crop_shape=None, num_inference_steps=3,
    )


def save_checkpoint(config: Any, directory: Path, stats: Mapping[str, Any], seed: int = 0, tokenizer: Path | None = None) -> Path:
    """Random weights, saved the way LeRobot's training saves a checkpoint.

    ``tokenizer``: a local tokenizer directory for the pre-processor's
    tokenizer step, in place of the hub tokenizer LeRobot's factory names
    (see :func:`save_processors`).
    """
    torch.manual_seed(seed)
    policy = get_policy_class(config.type)(config)
    directory.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(directory)
    del policy
    release_memory()  # pi0's weights are many GB
    return save_processors(config, directory, stats, tokenizer)


def release_memory() -> None:
    """Collect garbage, and hand the freed heap back to the system.

    glibc keeps large freed blocks in each thread's arena: after a model of
    many GB is dropped, the next one (loaded by a server thread) would
    otherwise come on top of it.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def save_processors(config: Any, directory: Path, stats: Mapping[str, Any], tokenizer: Path | None = None) -> Path:
    """The checkpoint's pre- and post-processor pipelines, built by LeRobot's factory and saved.

    With ``tokenizer``, the hub tokenizer that the factory names (pi0 and
    pi0.5 hard-code ``google/paligemma-3b-pt-224``) is read from that local
    directory while the pipeline is built, and the saved pipeline names the
    directory: loading the checkpoint needs no hub either.
    """
    from lerobot.processor import tokenizer_processor

    with _tokenizer_from(tokenizer) if tokenizer is not None else contextlib.nullcontext():
        preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=dict(stats))
    for step in preprocessor.steps:
        if tokenizer is not None and isinstance(step, tokenizer_processor.TokenizerProcessorStep):
            step.tokenizer_name = str(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    preprocessor.save_pretrained(directory)
    postprocessor.save_pretrained(directory)
    return directory


def _tokenizer_from(directory: Path) -> Any:
    """While building pipelines: LeRobot's tokenizer step loads every tokenizer name from ``directory``."""
    from lerobot.processor import tokenizer_processor
    from transformers import AutoTokenizer

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
            return AutoTokenizer.from_pretrained(str(directory), *args, **kwargs)

    return mock.patch.object(tokenizer_processor, "AutoTokenizer", LocalTokenizer)


def build(tmp_path_factory: pytest.TempPathFactory, name: str, kind: str = "act", state_dim: int = 6, action_dim: int = 6,
          cameras: Mapping[str, tuple[int, int]] | None = None, **options: Any) -> Path:
    """Build (once per session) and return the checkpoint directory ``name``."""
    if name not in _BUILT:
        make = act_config if kind == "act" else diffusion_config
        config = make(state_dim, action_dim, cameras, **options)
        cams = {key.rpartition(".")[2]: None for key in config.image_features}
        directory = tmp_path_factory.mktemp("checkpoints") / name
        _BUILT[name] = save_checkpoint(config, directory, dataset_stats(state_dim, action_dim, cams))
    return _BUILT[name]


def run_in_process(directory: Path, batch: Mapping[str, Any], seed: int | None = None) -> np.ndarray:
    """LeRobot's own path, without policylink: load, pre-process, predict the chunk, post-process.

    ``seed`` seeds torch right before predicting (for policies that sample noise).
    """
    from lerobot.configs.policies import PreTrainedConfig

    config = PreTrainedConfig.from_pretrained(str(directory))
    policy = get_policy_class(config.type).from_pretrained(str(directory), config=config).eval()
    pre, post = make_pre_post_processors(config, pretrained_path=str(directory))
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        actions = post(policy.predict_action_chunk(pre(dict(batch))))
    return actions[0].numpy()


@pytest.fixture(scope="session")
def act_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ACT, 6-d state and action, one 48x64 ``front`` camera, chunk 16."""
    return build(tmp_path_factory, "act")


@pytest.fixture(scope="session")
def diffusion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Diffusion, 6-d state and action, one 32x32 ``front`` camera, 2 observation steps, chunk 8."""
    return build(tmp_path_factory, "diffusion", kind="diffusion")


@pytest.fixture(scope="session")
def act_two_cams_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ACT with ``front`` and ``wrist`` cameras (32x32), for camera-mapping tests."""
    return build(tmp_path_factory, "act_two_cams", cameras={"front": (32, 32), "wrist": (32, 32)})


# -- SmolVLA: a flow-matching VLA, with a tiny vision-language backbone built offline ---------


#: A tiny SmolVLM (fast on a CPU): text, vision, pixel-shuffle factor, tokens per image.
TINY_SMOLVLM = {
    "text": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
    "scale_factor": 2, "image_seq_len": 1,
}


def build_smolvlm_backbone(directory: Path, size: Mapping[str, Any] = TINY_SMOLVLM) -> Path:
    """A SmolVLM config (``size``: default tiny), a small tokenizer and processor, saved where SmolVLA's ``vlm_model_name`` points.

    SmolVLA normally fetches SmolVLM2's config and tokenizer from the Hugging
    Face hub even for random weights; a local directory with the same files
    lets LeRobot build the whole policy offline. The tokenizer knows a few
    words; a ``vocab_size`` in ``size["text"]`` keeps a larger embedding table.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    special = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    words = "pick place lift stack sort the a up on and red green blue cube cubes .".split()
    vocab = {word: index for index, word in enumerate(dict.fromkeys([*special, *grid, *words, "\n"]))}
    text = {"vocab_size": len(vocab), **size["text"]}
    assert len(vocab) <= text["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        additional_special_tokens=special[2:],
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )
    edge = {"longest_edge": size["vision"]["image_size"]}
    images = SmolVLMImageProcessor(do_resize=False, do_image_splitting=False, size=edge, max_image_size=edge)
    SmolVLMProcessor(image_processor=images, tokenizer=fast, video_processor=SmolVLMVideoProcessor(),
                     image_seq_len=size["image_seq_len"]).save_pretrained(directory)
    SmolVLMConfig(
        text_config=text, vision_config=dict(size["vision"]), scale_factor=size["scale_factor"], image_token_id=fast.image_token_id,
        vocab_size=text["vocab_size"], tie_word_embeddings=text.get("tie_word_embeddings", False),
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def smolvla_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolVLA (random weights, tiny backbone built offline), 6-d, one 32x32 ``front`` camera, chunk 8."""
    pytest.importorskip("transformers", reason="SmolVLA needs the [vla] extra (transformers)")
    if "smolvla" not in _BUILT:
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

        root = tmp_path_factory.mktemp("smolvla")
        backbone = build_smolvlm_backbone(root / "backbone")
        inputs, outputs = features(6, 6, {"front": (32, 32)})
        config = SmolVLAConfig(
            input_features=inputs, output_features=outputs, device="cpu",
            vlm_model_name=str(backbone), load_vlm_weights=False, num_vlm_layers=2, expert_width_multiplier=0.5,
            chunk_size=8, n_action_steps=8, num_steps=2, resize_imgs_with_padding=(32, 32), tokenizer_max_length=16,
            max_state_dim=8, max_action_dim=8,
        )
        _BUILT["smolvla"] = save_checkpoint(config, root / "checkpoint", dataset_stats(6, 6, {"front": None}))
    return _BUILT["smolvla"]


# -- pi0 and pi0.5: PaliGemma-based flow-matching VLAs ----------------------------------------

#: The smallest pair of Gemma sizes with which LeRobot 0.4.4's pi0 / pi0.5 run (about 3.5 B parameters,
#: 14 GB of float32 weights). Their configuration also accepts ``gemma_300m`` for the vision-language
#: model (1.6 B parameters), but such a model fails at its first inference: LeRobot fixes PaliGemma's image
#: projection at 2048 wide (``projection_dim``, the width of ``gemma_2b``) while ``gemma_300m`` embeds
#: text 1024 wide, and the two are concatenated.
PI_VARIANTS = {"paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m"}
#: Memory a pi0 / pi0.5 session needs: LeRobot's ``from_pretrained`` builds the model (random weights),
#: then reads the whole state dict beside it, so a load peaks at about twice the weights.
PI_MEMORY_BYTES = 34 * 2**30


def pi_unavailable() -> str | None:
    """Why LeRobot's pi0 / pi0.5 cannot run in this environment (``None`` when they can)."""
    try:
        from transformers.models.siglip import check
    except ImportError:
        return ("LeRobot's pi0 / pi0.5 need its patched transformers (branch fix/lerobot_openpi, LeRobot's `pi` extra, "
                "installed from source): this transformers lacks its Gemma adaRMS changes and siglip.check")
    if not check.check_whether_transformers_replace_is_installed_correctly():
        return "LeRobot's patched transformers is installed, but its own check rejects this version"
    available = _available_memory()
    if available is not None and available < PI_MEMORY_BYTES:
        return f"pi0 / pi0.5 (gemma_2b + gemma_300m) need about {PI_MEMORY_BYTES / 2**30:.0f} GiB of memory; {available / 2**30:.0f} GiB available"
    return None


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def build_paligemma_tokenizer(directory: Path) -> Path:
    """A small word-level stand-in for PaliGemma's tokenizer (``google/paligemma-3b-pt-224``), saved in ``directory``.

    Like PaliGemma's: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3 and a
    ``<bos>`` before each prompt (the pipeline pads on the right to its
    ``max_length``). Its words cover the tests' prompts, pi0.5's prompt
    template (``Task: ..., State: ...;\nAction:``) and the 0-255 bins of
    pi0.5's state tokens; ids stay far below the models' 257,152 embeddings.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = "pick place lift stack sort the a up on and red green blue cube cubes Task State Action : , ; . -".split()
    vocab = {word: index for index, word in enumerate(dict.fromkeys([*special, *words, *map(str, range(256))]))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation apart
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return directory


def pi_config(kind: str, state_dim: int = 6, action_dim: int = 6) -> Any:
    """pi0 or pi0.5 at the smallest size LeRobot runs: :data:`PI_VARIANTS`, one 14x14 camera (one SigLIP patch), chunk 8."""
    inputs, outputs = features(state_dim, action_dim, {"front": (14, 14)})
    options = dict(
        input_features=inputs, output_features=outputs, device="cpu", dtype="float32", **PI_VARIANTS,
        image_resolution=(14, 14), chunk_size=8, n_action_steps=8, num_inference_steps=2, max_state_dim=8, max_action_dim=8,
    )
    if kind == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config

        return PI0Config(**options, tokenizer_max_length=8)  # "<bos> stack the blue cubes" and padding
    from lerobot.policies.pi05.configuration_pi05 import PI05Config

    # pi0.5's prompt carries the state: "<bos> Task : pick the red cube , State : s1 .. s32 ; Action :" is 45
    # tokens. 32 state bins, not max_state_dim's 8: LeRobot saves its state step without its settings, and
    # the step it loads back pads the state to its default 32.
    return PI05Config(**options, tokenizer_max_length=48)


def pi_stats(kind: str, state_dim: int = 6, action_dim: int = 6) -> dict[str, dict[str, Any]]:
    """:func:`dataset_stats`, plus the 1st/99th percentiles that pi0.5's QUANTILES normalisation reads."""
    stats = dataset_stats(state_dim, action_dim, {"front": None})
    if kind == "pi05":
        for moments in stats.values():
            moments["q01"], moments["q99"] = moments["min"], moments["max"]
    return stats


def build_pi(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    """Build (once per session) the ``pi0`` or ``pi05`` checkpoint, with its tokenizer beside it."""
    if kind not in _BUILT:
        root = tmp_path_factory.mktemp(kind)
        tokenizer = build_paligemma_tokenizer(root / "tokenizer")
        _BUILT[kind] = save_checkpoint(pi_config(kind), root / "checkpoint", pi_stats(kind), tokenizer=tokenizer)
    return _BUILT[kind]


def _pi_dir(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Iterator[Path]:
    reason = pi_unavailable()
    if reason is not None:
        pytest.skip(reason)
    directory = build_pi(tmp_path_factory, kind)
    yield directory
    # 14 GB of weights: not left behind in pytest's kept temporary directories.
    _BUILT.pop(kind, None)
    shutil.rmtree(directory.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def pi0_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pi0 (random weights, gemma_2b + gemma_300m, tokenizer built offline), 6-d, one 14x14 ``front`` camera, chunk 8."""
    yield from _pi_dir(tmp_path_factory, "pi0")


@pytest.fixture(scope="session")
def pi05_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pi0.5 (as :func:`pi0_dir`; the state reaches the model as tokens of the prompt)."""
    yield from _pi_dir(tmp_path_factory, "pi05")
