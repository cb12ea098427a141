"""MP4 videos of evaluation episodes (imageio + its bundled ffmpeg), streamed frame by frame.

:class:`VideoWriter` hands every frame to the encoder as the episode runs,
so recording an episode holds no frames in memory however long it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VideoWriter", "write_mp4"]


def _imageio() -> Any:
    try:
        import imageio.v2 as imageio
    except ImportError as exc:
        raise ImportError(f"episode videos need imageio with ffmpeg: pip install 'policylink[sim]' ({exc})") from None
    return imageio


class VideoWriter:
    """An H.264 MP4 at ``path`` that receives ``HxWx3`` uint8 frames one at a time.

    The file (and its folder) is created at the first frame; :meth:`close`
    finishes it, :meth:`discard` closes and deletes it (an episode that did
    not finish). As a context manager it closes on success and discards on
    an error.
    """

    def __init__(self, path: Path, fps: float) -> None:
        self._imageio = _imageio()  # fail before the episode, not at its first frame
        self.path = Path(path)
        self.fps = fps
        #: Frames handed to the encoder so far.
        self.frames = 0
        self._writer: Any = None
        self._closed = False

    def append(self, frame: np.ndarray) -> None:
        """Encode one frame now (nothing is kept)."""
        if self._closed:
            raise ValueError(f"the video {self.path} is closed")
        data = np.asarray(frame, dtype=np.uint8)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # macro_block_size=1: keep odd frame sizes as they are instead of resizing with a warning.
            self._writer = self._imageio.get_writer(self.path, fps=self.fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error")
        self._writer.append_data(data)
        self.frames += 1

    def close(self) -> Path | None:
        """Finish the file; its path, or ``None`` when no frame came (no file then)."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        return self.path if self.frames else None

    def discard(self) -> None:
        """Close and delete the file (an interrupted or failed episode leaves no video)."""
        try:
            self.close()
        finally:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_mp4(path: Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write ``frames`` (``HxWx3`` uint8; any iterable, consumed one at a time) to ``path`` as H.264 MP4."""
    with VideoWriter(path, fps) as video:
        for frame in frames:
            video.append(frame)
        if not video.frames:
            raise ValueError(f"no frames to write to {path}")
    return path
