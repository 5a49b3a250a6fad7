"""The data stages of ``make demo``: synth -> train-vae -> encode -> verify, sized for 2 CPU cores.

Each stage reuses finished work when run again (videos, the VAE, shard jobs), so an interrupted
demo continues where it stopped. ``scd_train.demo`` then trains from the shards and samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.encode import EncodeOptions, encode
from data_prep.synth import write_synthetic
from data_prep.train_vae import VaeTrainOptions, train_vae
from data_prep.verify import verify
from scd_train.config import SyntheticDataConfig
from scd_train.errors import RunFailure

CLIP_FRAMES = 8  # configs/tiny_shards.yaml trains on 8-frame clips


@dataclass
class DemoScale:
    videos: int = 128
    frames: int = 24
    size: int = 64
    vae_steps: int = 150
    vae_batch: int = 8
    context: int = 4
    unroll: int = 12
    workers: int | None = None
    progress: bool = True


def _stage(name: str, timings: dict[str, float]) -> None:
    print(f"== {name}", flush=True)
    timings[name] = time.perf_counter()


def _done(name: str, timings: dict[str, float]) -> None:
    timings[name] = time.perf_counter() - timings[name]


def prepare_shards(out: Path, scale: DemoScale, timings: dict[str, float] | None = None) -> list[str]:
    """Videos, VAE and verified shards under ``out``; returns the overrides that point
    configs/tiny_shards.yaml at them."""
    timings = {} if timings is None else timings
    _stage("synth", timings)
    syn = SyntheticDataConfig(num_videos=scale.videos, frames_per_video=scale.frames, image_size=scale.size,
                              digit_scale=max(1, scale.size // 16), speed=max(1, scale.size // 20))
    write_synthetic(out / "videos", syn, seed=0, progress=scale.progress)
    _done("synth", timings)

    _stage("train-vae", timings)
    vae = out / "vae"
    if not (vae / "config.json").is_file():
        report = train_vae(VaeTrainOptions(out / "videos" / "train", vae, size=scale.size, steps=scale.vae_steps,
                                           batch_size=scale.vae_batch, progress=scale.progress))
        print(f"VAE reconstruction PSNR {report['psnr_db']:.1f} dB")
    _done("train-vae", timings)

    _stage("encode", timings)
    for split, frames, stride in (("train", CLIP_FRAMES, 4), ("holdout", scale.context + scale.unroll, 8)):
        summary = encode(EncodeOptions(out / "videos" / split, out / "shards" / split, vae, height=scale.size,
                                       width=scale.size, clip_frames=frames, stride=stride, workers=scale.workers,
                                       progress=scale.progress))
        print(f"{split}: {summary.clips} clips, {summary.frames_per_second:.0f} frames/s, {len(summary.bad)} bad")
        report = verify(out / "shards" / split, progress=False)
        if not report.ok:
            raise RunFailure(f"verify {split}: {report.problems[:3]}")
    _done("encode", timings)
    return [f"data.path={out / 'shards' / 'train'}", f"data.holdout_path={out / 'shards' / 'holdout'}",
            f"data.clip_frames={CLIP_FRAMES}"]
