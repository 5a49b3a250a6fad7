"""Training from latent shards: the manifest checked against the config, the loader, held-out clips, codec."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from scd_train.config import Config
from scd_train.data.latent_checks import spot_check_readers
from scd_train.data.manifest import Manifest, ManifestError, load_manifest
from scd_train.data.memory import ClipSet
from scd_train.data.shard_loader import ShardLoader
from scd_train.data.shard_readers import open_shards
from scd_train.data.vae_codec import VaeCodec
from scd_train.data.vae_identity import check_recorded_identity, compare, describe, same_vae
from scd_train.errors import ScdWarning
from scd_train.storage import CacheSettings, RetryPolicy, parse_size

log = logging.getLogger(__name__)

# Held-out clips read for sampling and evaluation; more than any sampler request needs.
MAX_HOLDOUT_CLIPS = 64


def check_manifest(manifest: Manifest, cfg: Config, frames_needed: int, role: str = "data.path") -> None:
    """Refuse data that does not fit the model, naming the config value and the manifest value."""
    m, where = cfg.model, f"{manifest.root}/manifest.json ({role})"
    pairs = [("model.latent_channels", m.latent_channels, "latent channels", manifest.channels),
             ("model.latent_height", m.latent_height, "latent height", manifest.height),
             ("model.latent_width", m.latent_width, "latent width", manifest.width),
             ("data.normalization", cfg.data.normalization, "normalization kind", manifest.normalization.kind)]
    for cfg_key, cfg_value, what, value in pairs:
        if cfg_value != value:
            raise ManifestError(f"{cfg_key}={cfg_value!r} but {where} records {what} {value!r}")
    if frames_needed > manifest.frames:
        raise ManifestError(f"{frames_needed} frames per clip are needed (data.clip_frames or the sampler's context "
                            f"+ rollout) but {where} records clips of {manifest.frames} frames")
    if m.num_actions > 0:
        if not manifest.has_actions:
            raise ManifestError(f"model.num_actions={m.num_actions} but {where} records no actions; "
                                "set model.num_actions=0 or encode videos with action files")
        if manifest.num_action_classes > m.num_actions:
            raise ManifestError(f"model.num_actions={m.num_actions} but {where} records "
                                f"{manifest.num_action_classes} action classes")
    identified = check_recorded_identity(manifest, cfg, where)
    if cfg.data.vae_path is not None and identified:
        from scd_train.data.vae import vae_info

        compare(vae_info(cfg.data.vae_path).to_dict(), manifest.vae, f"data.vae_path={cfg.data.vae_path}", where)
    if len(fps := manifest.raw.get("video", {}).get("fps") or []) > 1:
        warnings.warn(f"{where} mixes clips of {', '.join(f'{f:g}' for f in fps)} fps (encoded with "
                      "--allow-mixed-fps); motion per frame differs between them", ScdWarning, stacklevel=2)


def retry_policy(cfg: Config) -> RetryPolicy:
    return RetryPolicy(attempts=cfg.data.remote_retries, first_delay_s=cfg.data.remote_retry_delay_s)


def cache_settings(cfg: Config) -> CacheSettings:
    return CacheSettings(cfg.data.cache_dir, parse_size(cfg.data.cache_limit))


def build_shard_loader(cfg: Config, rank: int, world_size: int) -> ShardLoader:
    manifest = load_manifest(cfg.data.path, retry=retry_policy(cfg))
    check_manifest(manifest, cfg, cfg.data.clip_frames)
    loader = ShardLoader(manifest, cfg.data.source, batch_size=cfg.data.batch_size, seed=cfg.data.seed,
                         clip_frames=cfg.data.clip_frames, use_actions=cfg.model.num_actions > 0, rank=rank,
                         world_size=world_size, num_workers=cfg.data.num_workers, on_corrupt=cfg.data.on_corrupt,
                         max_corrupt_skips=cfg.data.max_corrupt_skips, cache=cache_settings(cfg))
    if (problem := spot_check_readers(loader.readers, manifest)) is not None:
        raise ManifestError(f"data.path={cfg.data.path}: {problem}")
    log.info("%s shards in %s: %d samples, %d batches per epoch per rank (seed %d, rank %d of %d)",
             cfg.data.source, cfg.data.path, loader.plan.total, loader.batches_per_epoch, cfg.data.seed, rank,
             world_size)
    return loader


def shard_holdout_clips(cfg: Config, frames: int) -> tuple[ClipSet, VaeCodec]:
    """The first held-out clips in manifest order (deterministic), cut to ``frames`` frames."""
    if cfg.data.holdout_path is None:
        raise ManifestError(f"data.source={cfg.data.source!r}: sampling and evaluation read held-out clips from "
                            "data.holdout_path, which is not set (encode held-out videos into their own directory)")
    manifest = load_manifest(cfg.data.holdout_path, "data.holdout_path", retry=retry_policy(cfg))
    check_manifest(manifest, cfg, frames, role="data.holdout_path")
    train = load_manifest(cfg.data.path, retry=retry_policy(cfg)) if cfg.data.path else None
    if train is not None and not same_vae(train.vae, manifest.vae):
        raise ManifestError(f"held-out clips in {cfg.data.holdout_path} were encoded by {describe(manifest.vae)} "
                            f"but the training shards in {cfg.data.path} by {describe(train.vae)}")
    norm = (train or manifest).normalization  # the statistics the model was trained with
    samples = []
    for reader in open_shards(manifest, cfg.data.source, cache_settings(cfg)):
        for i in range(len(reader)):
            if len(samples) == MAX_HOLDOUT_CLIPS:
                break
            samples.append(reader.read(i))
    latents = norm.normalize(torch.from_numpy(np.stack([s.latents[:frames] for s in samples])))
    actions = None
    if cfg.model.num_actions > 0:
        actions = torch.from_numpy(np.stack([s.actions[:frames] for s in samples]).astype(np.int64))
    clips = ClipSet(latents, actions, frames, frames, [s.key for s in samples])
    vae_path = cfg.data.vae_path or manifest.vae.get("path")
    if vae_path is None:
        raise ManifestError(f"{cfg.data.holdout_path}/manifest.json records no vae.path to decode with; set "
                            "data.vae_path to the VAE that encoded the clips")
    return clips, VaeCodec(vae_path, norm, expected=manifest.vae,
                           expected_label=f"{cfg.data.holdout_path}/manifest.json")
