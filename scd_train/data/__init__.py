"""Readers of latent clips: the in-memory synthetic set and (webdataset, MDS) shards."""

from __future__ import annotations

from scd_train.config import Config, ConfigError, ModelConfig
from scd_train.data.batch import Batch, ResumableLoader
from scd_train.data.memory import ClipSet, ShuffledLoader, synthetic_clips

__all__ = ["Batch", "ClipSet", "ResumableLoader", "ShuffledLoader", "build_train_loader", "check_latent_shape"]


def check_latent_shape(shape: tuple[int, int, int], model: ModelConfig, source: str) -> None:
    """Stop with both values named when the data's latent frames do not fit the model."""
    expected = (model.latent_channels, model.latent_height, model.latent_width)
    if tuple(shape) != expected:
        raise ConfigError(
            f"{source} yields latent frames of shape (C, H, W)={tuple(shape)} but the model expects "
            f"(model.latent_channels, model.latent_height, model.latent_width)={expected}")


def build_train_loader(cfg: Config, rank: int = 0, world_size: int = 1) -> ResumableLoader:
    if cfg.data.source == "synthetic":
        clips, _ = synthetic_clips(cfg.data, "train")
        check_latent_shape(tuple(clips.latents.shape[2:]), cfg.model, "the synthetic data")
        return ShuffledLoader(clips, cfg.data.batch_size, cfg.data.seed, rank, world_size)
    from scd_train.data.shards import build_shard_loader

    return build_shard_loader(cfg, rank, world_size)
