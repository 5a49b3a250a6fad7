"""Clips held in memory (the synthetic default) and a deterministic, resumable batch loader."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from scd_train.config import ConfigError, DataConfig
from scd_train.data.batch import Batch
from scd_train.data.codec import SpaceToDepthCodec
from scd_train.data.synthetic import render_videos, split_indices
from scd_train.errors import ResumeError


class ClipSet:
    """Fixed-length clips cut from videos with a stride; clip i is (video, start)."""

    def __init__(self, latents: Tensor, actions: Tensor | None, clip_frames: int, stride: int,
                 video_names: list[str]) -> None:
        frames = latents.shape[1]
        if frames < clip_frames:
            raise ConfigError(f"videos have {frames} frames, fewer than data.clip_frames={clip_frames}")
        self.latents, self.actions, self.clip_frames = latents, actions, clip_frames
        self.video_names = video_names
        starts = range(0, frames - clip_frames + 1, stride)
        self.index = [(v, s) for v in range(latents.shape[0]) for s in starts]

    def __len__(self) -> int:
        return len(self.index)

    def key(self, i: int) -> str:
        video, start = self.index[i]
        return f"{self.video_names[video]}/{start:06d}"

    def collate(self, indices: list[int]) -> Batch:
        window = [(v, slice(s, s + self.clip_frames)) for v, s in (self.index[i] for i in indices)]
        latents = torch.stack([self.latents[v, sl] for v, sl in window])
        actions = None if self.actions is None else torch.stack([self.actions[v, sl] for v, sl in window])
        return Batch(latents, actions, [self.key(i) for i in indices])


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The same permutation on every rank: seeded by integers, never by hash()."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


class ShuffledLoader:
    """Per-epoch (seed, epoch) shuffle split by rank, equal batches on every rank, exact resume.

    Each epoch drops the tail that would give ranks unequal batch counts, so no rank ever waits
    in a collective for another that ran out of data.
    """

    def __init__(self, clips: ClipSet, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.clips, self.batch_size, self.seed = clips, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(clips) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{len(clips)} clips cannot fill one batch of data.batch_size={batch_size} on each "
                              f"of {world_size} rank(s) (world size detected); lower data.batch_size or add data")
        self.epoch, self.batch_in_epoch = 0, 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = epoch_permutation(len(self.clips), self.seed, self.epoch)
            usable = order[: self.batches_per_epoch * self.batch_size * self.world_size]
            mine = usable[self.rank::self.world_size]
            while self.batch_in_epoch < self.batches_per_epoch:
                start = self.batch_in_epoch * self.batch_size
                self.batch_in_epoch += 1
                yield self.clips.collate(mine[start:start + self.batch_size].tolist())
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "batch_size"):
            if state[key] != getattr(self, key):
                raise ResumeError(f"data position saved with {key}={state[key]} cannot resume with "
                                 f"{key}={getattr(self, key)}")
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]


def synthetic_clips(cfg: DataConfig, split: str = "train") -> tuple[ClipSet, SpaceToDepthCodec]:
    """Render the synthetic videos of ``split`` ('train' or 'holdout') and encode them losslessly."""
    syn = cfg.synthetic
    train, held = split_indices(syn)
    indices = train if split == "train" else held
    frames, actions = render_videos(syn, cfg.seed, indices)
    codec = SpaceToDepthCodec(syn.codec_factor)
    latents = codec.encode(torch.from_numpy(frames))
    names = [f"synthetic-{i:06d}" for i in indices]
    return ClipSet(latents, torch.from_numpy(actions), cfg.clip_frames, cfg.clip_stride, names), codec
