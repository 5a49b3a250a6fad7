"""Played frames as a video: panels side by side, enlarged, generated frames framed in red."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scd_train.play.session import TickResult
from scd_train.video import mark_generated, side_by_side, upscale, write_gif, write_mp4

# Frames are enlarged (nearest neighbour) to at least this many pixels high so small worlds are watchable.
MIN_VIDEO_HEIGHT = 128
VIDEO_SUFFIXES = (".mp4", ".gif")


def video_scale(height: int) -> int:
    return max(1, -(-MIN_VIDEO_HEIGHT // height))


class Recorder:
    """Collects composed frames (bounded) and writes them as mp4 or gif, atomically."""

    def __init__(self, max_frames: int = 20 * 60 * 10) -> None:
        self.frames: list[np.ndarray] = []
        self.max_frames = max_frames

    @property
    def full(self) -> bool:
        return len(self.frames) >= self.max_frames

    def add(self, result: TickResult) -> None:
        if not self.full:
            self.frames.append(compose(result))

    def write(self, path: Path, fps: int) -> Path:
        if not self.frames:
            raise ValueError("nothing was recorded")
        return write_video(np.stack(self.frames), path, fps)


def compose(result: TickResult) -> np.ndarray:
    """One (H, W, 3) frame: every panel enlarged, side by side; generated frames get a red frame."""
    scale = video_scale(result.images[0].shape[0])
    panels = [upscale(image[None], scale) for image in result.images]
    if result.generated:
        panels = [mark_generated(p, 0) for p in panels]
    return side_by_side(panels)[0] if len(panels) > 1 else panels[0][0]


def write_video(frames: np.ndarray, path: Path, fps: int) -> Path:
    """(T, H, W, 3) uint8 frames to ``path``; the suffix picks the format (.mp4 or .gif)."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: the video must end in .mp4 or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = write_gif if path.suffix.lower() == ".gif" else write_mp4
    return writer(frames, path, fps)
