"""How a world's frames become square S x S frames, the same way at recording and at evaluation.

``stretch``: the whole frame is scaled to S x S (aspect ratio not kept), so nothing the game shows
is lost; Atari's 210x160 frames use it, since a centre crop to a square would cut off the rows the
paddle or player lives in. ``crop``: scaled to cover S x S, then centre-cropped (the rule
``scd-data encode`` applies to videos of another size). Both scale with Pillow's bilinear filter,
which widens its support when shrinking (antialiased), so thin objects fade rather than vanish.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESIZE_MODES = ("stretch", "crop")


def resize_frame(frame: np.ndarray, size: int, mode: str) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    image = Image.fromarray(frame)
    if mode == "stretch":
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    scale = max(size / h, size / w)
    scaled = (max(size, round(w * scale)), max(size, round(h * scale)))
    image = image.resize(scaled, Image.Resampling.BILINEAR)
    left, top = (scaled[0] - size) // 2, (scaled[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def resize_frames(frames: np.ndarray, size: int, mode: str) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, size, size, 3)."""
    return np.stack([resize_frame(f, size, mode) for f in frames])
