"""Held-out clips for sampling and evaluation, with the codec that turns latents back into pixels."""

from __future__ import annotations

import dataclasses

from scd_train.config import Config
from scd_train.data.codec import LatentCodec
from scd_train.data.memory import ClipSet, synthetic_clips
from scd_train.errors import InputError


def holdout_clips(cfg: Config, frames: int) -> tuple[ClipSet, LatentCodec]:
    """Clips of ``frames`` frames (context + rollout) from data the model did not train on."""
    if cfg.data.source == "synthetic":
        syn = cfg.data.synthetic
        if frames > syn.frames_per_video:
            raise InputError(f"{frames} frames per clip are needed (context + rollout) but the synthetic videos have "
                             f"data.synthetic.frames_per_video={syn.frames_per_video}")
        data = dataclasses.replace(cfg.data, clip_frames=frames, clip_stride=syn.frames_per_video)
        return synthetic_clips(data, "holdout")
    from scd_train.data.shards import shard_holdout_clips

    return shard_holdout_clips(cfg, frames)


def holdout_clip_frames(cfg: Config) -> int:
    """The longest held-out clips the data provides, in frames (ground truth for a rollout)."""
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic.frames_per_video
    from scd_train.data.manifest import ManifestError, load_manifest

    if cfg.data.holdout_path is None:
        raise ManifestError(f"data.source={cfg.data.source!r}: held-out clips come from data.holdout_path, "
                            "which is not set")
    return load_manifest(cfg.data.holdout_path, "data.holdout_path").frames
