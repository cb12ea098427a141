"""Small real LeRobot checkpoints for the tests, built once per test session.

Each checkpoint is a real ACT or Diffusion policy with random weights and
made-up dataset statistics, saved with LeRobot's own ``save_pretrained`` and
its pre/post-processor pipelines' ``save_pretrained``: exactly the files a
training run writes. Nothing is downloaded (ACT's ImageNet backbone weights
are switched off).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def save_checkpoint(config: Any, directory: Path, stats: Mapping[str, Any], seed: int = 0) -> Path:
    """Random weights, saved the way LeRobot's training saves a checkpoint."""
    torch.manual_seed(seed)
    policy = get_policy_class(config.type)(config)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=dict(stats))
    directory.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(directory)
    preprocessor.save_pretrained(directory)
    postprocessor.save_pretrained(directory)
    return directory


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


def build_smolvlm_backbone(directory: Path) -> Path:
    """A tiny SmolVLM config, tokenizer and processor, saved where SmolVLA's ``vlm_model_name`` points.

    SmolVLA normally fetches SmolVLM2's config and tokenizer from the Hugging
    Face hub even for random weights; a local directory with the same files
    lets LeRobot build the whole policy offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    special = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    words = "pick place lift stack sort the a up on and red green blue cube cubes .".split()
    vocab = {word: index for index, word in enumerate(dict.fromkeys([*special, *grid, *words, "\n"]))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        additional_special_tokens=special[2:],
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )
    images = SmolVLMImageProcessor(do_resize=False, do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    SmolVLMProcessor(image_processor=images, tokenizer=fast, video_processor=SmolVLMVideoProcessor(), image_seq_len=1).save_pretrained(directory)
    SmolVLMConfig(
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": len(vocab), "max_position_embeddings": 256},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        scale_factor=2, image_token_id=fast.image_token_id, vocab_size=len(vocab),
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
