"""Builders of small latent datasets for the data-pipeline tests: a random tiny VAE and uneven inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.encode import EncodeOptions, encode
from data_prep.train_vae import tiny_vae_config
from scd_train.config import SyntheticDataConfig
from scd_train.data.synthetic import render_video

FRAME_SIZE = 32
CLIP_FRAMES = 4
STRIDE = 2
# Uneven video lengths make uneven shards (3 videos per shard): 10, 16, 30 | 8, 12, 20 | 9, 26, 14 | 11
LENGTHS = (10, 16, 30, 8, 12, 20, 9, 26, 14, 11)


def save_random_vae(folder: Path, latent_channels: int = 4) -> Path:
    import torch

    from scd_train.data.vae import diffusers_class

    AutoencoderKL = diffusers_class("AutoencoderKL")  # noqa: N806
    torch.manual_seed(0)
    AutoencoderKL(**tiny_vae_config(latent_channels, 8, 8, FRAME_SIZE)).save_pretrained(str(folder))
    return folder


def write_inputs(folder: Path, lengths=LENGTHS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """.npy videos (T, H, W, 3) uint8 with ``.actions.npy`` beside each; returns (frames, actions) per video."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = []
    for i, length in enumerate(lengths):
        cfg = SyntheticDataConfig(frames_per_video=length, image_size=FRAME_SIZE, digit_scale=2)
        frames, actions = render_video(cfg, seed, i)
        frames = frames.transpose(0, 2, 3, 1)
        np.save(folder / f"video-{i:02d}.npy", frames)
        np.save(folder / f"video-{i:02d}.actions.npy", actions)
        videos.append((frames, actions))
    return videos


def clips_per_video(lengths=LENGTHS) -> list[int]:
    return [(n - CLIP_FRAMES) // STRIDE + 1 for n in lengths]


def encode_options(inputs: Path, out: Path, vae: Path, **overrides) -> EncodeOptions:
    base = dict(formats=["webdataset", "mds"], height=FRAME_SIZE, width=FRAME_SIZE, clip_frames=CLIP_FRAMES,
                stride=STRIDE, videos_per_shard=3, dtype="float32", workers=1, progress=False, num_actions=4)
    base.update(overrides)
    return EncodeOptions(inputs, out, vae, **base)


def build_dataset(root: Path, **overrides) -> Path:
    vae = save_random_vae(root / "vae")
    write_inputs(root / "videos")
    encode(encode_options(root / "videos", root / "shards", vae, **overrides))
    return root / "shards"
