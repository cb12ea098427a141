"""Camera-like test frames for the transport benchmarks.

JPEG's size and speed depend on the picture: random noise barely compresses,
a flat colour compresses to nothing. These frames are built to look like a
robot camera's view of a table: lit from one side, a wood-like table
texture, a few shaded objects, and sensor noise. Deterministic per seed.
"""

from __future__ import annotations

import numpy as np


def tabletop_frame(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """An ``HxWx3`` uint8 frame of a lit table with objects and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.55 + 0.45 * (1.0 - x / width) * (0.6 + 0.4 * y / height)
    # Table: warm base colour with low-frequency grain along x.
    grain = 0.08 * np.sin(x / 7.0 + 3.0 * np.sin(y / 40.0)) + 0.04 * np.sin(x / 2.3 + y / 31.0)
    frame = np.stack([0.62 + grain, 0.45 + 0.8 * grain, 0.30 + 0.5 * grain], axis=-1) * light[..., None]
    # Objects: shaded ellipses in saturated colours.
    for _ in range(5):
        cy, cx = rng.uniform(0.2, 0.9) * height, rng.uniform(0.1, 0.9) * width
        ry, rx = rng.uniform(0.05, 0.15) * height, rng.uniform(0.04, 0.12) * width
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        mask = inside <= 1.0
        shade = (1.0 - 0.5 * np.clip(inside, 0, 1))[..., None]
        frame[mask] = (rng.uniform(0.1, 1.0, 3) * shade)[mask]
    frame = frame * 255.0 + rng.normal(0.0, 2.0, frame.shape)  # sensor noise
    return np.clip(frame, 0, 255).astype(np.uint8)
