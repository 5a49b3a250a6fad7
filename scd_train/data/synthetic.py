"""The embedded default data: "moving digits" videos driven by per-frame actions.

scikit-learn's bundled 8x8 digits are upscaled, coloured and moved inside a frame. Action a_t
(right, left, down, up) sets the motion from frame t-1 to frame t, so frame t is predictable from
the recent frames and action t. A digit that hits a wall bounces off it and keeps the reversed heading
until the action changes, so the history, not just the last frame, decides the next one. Every video
is a pure function of (seed, video index), independent of how many videos are rendered.
"""

from __future__ import annotations

import functools

import numpy as np

from scd_train.config import SyntheticDataConfig
from scd_train.errors import InputError

ACTION_NAMES = ("right", "left", "down", "up")
ACTION_STEPS = np.array([(0, 1), (0, -1), (1, 0), (-1, 0)])  # (row, column) direction per action
NUM_ACTIONS = len(ACTION_NAMES)


@functools.cache
def _digit_images() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]


def render_video(cfg: SyntheticDataConfig, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One video: frames uint8 (F, 3, S, S) and actions int64 (F,), action t leading into frame t."""
    rng = np.random.default_rng([seed, index])
    digits = _digit_images()
    size, span = cfg.image_size, 8 * cfg.digit_scale
    if span > size:
        raise InputError(f"data.synthetic.digit_scale={cfg.digit_scale} makes {span}px digits, "
                         f"larger than image_size={size}")
    sprites = [np.kron(digits[rng.integers(len(digits))], np.ones((cfg.digit_scale, cfg.digit_scale)))
               for _ in range(cfg.digits_per_video)]
    colours = rng.uniform(0.4, 1.0, size=(cfg.digits_per_video, 3))
    # start on the speed grid so a bounce never lands where the digit already was
    positions = rng.integers(0, (size - span) // max(cfg.speed, 1) + 1, size=(cfg.digits_per_video, 2)) * cfg.speed
    actions = _action_sequence(rng, cfg.frames_per_video, cfg.action_change_prob)
    heading = np.ones_like(positions)  # per digit and axis: -1 after a bounce, until the action changes
    frames = np.zeros((cfg.frames_per_video, 3, size, size), dtype=np.float32)
    for t in range(cfg.frames_per_video):
        if t > 0:
            if actions[t] != actions[t - 1]:
                heading[:] = 1
            positions, heading = bounce(positions + cfg.speed * heading * ACTION_STEPS[actions[t]], heading,
                                        size - span)
        for sprite, colour, (row, col) in zip(sprites, colours, positions):
            patch = frames[t, :, row:row + span, col:col + span]
            np.maximum(patch, colour[:, None, None] * sprite[None], out=patch)
    return (frames * 255).round().astype(np.uint8), actions


def bounce(positions: np.ndarray, heading: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflect coordinates that left [0, limit] back inside and reverse the heading on that axis."""
    outside = (positions < 0) | (positions > limit)
    reflected = np.where(positions < 0, -positions, np.where(positions > limit, 2 * limit - positions, positions))
    return reflected, np.where(outside, -heading, heading)


def _action_sequence(rng: np.random.Generator, frames: int, change_prob: float) -> np.ndarray:
    actions = np.empty(frames, dtype=np.int64)
    actions[0] = rng.integers(NUM_ACTIONS)
    for t in range(1, frames):
        actions[t] = rng.integers(NUM_ACTIONS) if rng.random() < change_prob else actions[t - 1]
    return actions


def render_videos(cfg: SyntheticDataConfig, seed: int, indices: range | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked frames (V, F, 3, S, S) uint8 and actions (V, F) int64."""
    pairs = [render_video(cfg, seed, i) for i in indices]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def split_indices(cfg: SyntheticDataConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) video indices; the held-out ones are the last videos."""
    held = max(1, round(cfg.num_videos * cfg.holdout_fraction))
    return list(range(cfg.num_videos - held)), list(range(cfg.num_videos - held, cfg.num_videos))
