"""What evaluation reads: an iterable of held-out clips of latents and actions.

Any source (the synthetic held-out videos here, latent shards elsewhere) plugs in by yielding
``EvalClip`` objects in a fixed order and providing a decoder from latents to [0, 1] pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from scd_train.config import Config
from scd_train.data.holdout import holdout_clips
from scd_train.errors import InputError

Decode = Callable[[Tensor], Tensor]
"""Latents (..., C, h, w) -> frames (..., 3, H, W) in [0, 1]."""


@dataclass
class EvalClip:
    key: str
    latents: Tensor  # (F, C, H, W), normalized like the training data
    actions: Tensor | None  # (F,) int64, action t leads into frame t


def holdout_eval_clips(cfg: Config, frames: int, limit: int) -> tuple[list[EvalClip], Decode]:
    """The first ``limit`` held-out clips of ``frames`` frames, and the latent decoder."""
    clip_set, codec = holdout_clips(cfg, frames)
    count = min(limit, len(clip_set))
    clips = []
    for i in range(count):
        batch = clip_set.collate([i])
        actions = None if batch.actions is None else batch.actions[0]
        clips.append(EvalClip(batch.keys[0], batch.latents[0], actions))
    return clips, codec.decode


def batched(clips: Iterable[EvalClip], size: int) -> Iterator[list[EvalClip]]:
    it = iter(clips)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def stack_clips(clips: list[EvalClip], frames: int) -> tuple[Tensor, Tensor | None]:
    """(B, frames, C, H, W) latents and (B, frames) actions (None when clips carry none)."""
    short = [c.key for c in clips if c.latents.shape[0] < frames]
    if short:
        raise InputError(f"clips {short[:4]} have fewer than the {frames} frames the protocol needs")
    latents = torch.stack([c.latents[:frames] for c in clips])
    if any(c.actions is None for c in clips):
        return latents, None
    return latents, torch.stack([c.actions[:frames] for c in clips])
