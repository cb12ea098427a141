"""MP4 videos of evaluation episodes (imageio + its bundled ffmpeg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_mp4"]


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """Write ``frames`` (``HxWx3`` uint8) to ``path`` as H.264 MP4."""
    try:
        import imageio.v2 as imageio
    except ImportError as exc:
        raise ImportError(f"episode videos need imageio with ffmpeg: pip install 'policylink[sim]' ({exc})") from None
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1: keep odd frame sizes as they are instead of resizing with a warning.
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame, dtype=np.uint8))
    return path
