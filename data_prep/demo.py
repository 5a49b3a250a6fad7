"""The cached-latent path end to end: synth -> train-vae -> encode -> shards -> train -> sample.

    python -m data_prep.demo --out demo_out/shards_demo           # a few minutes on 2 cores

Each stage reuses finished work when run again (videos, the VAE, shard jobs, checkpoints), so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.encode import EncodeOptions, encode
from data_prep.synth import write_synthetic
from data_prep.train_vae import VaeTrainOptions, train_vae
from data_prep.verify import verify
from scd_train.config import SyntheticDataConfig, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_shards.yaml"
CLIP_FRAMES = 8


@dataclass
class DemoScale:
    videos: int = 128
    frames: int = 24
    size: int = 64
    vae_steps: int = 150
    vae_batch: int = 8
    train_steps: int = 200
    sample_clips: int = 4
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
            raise RuntimeError(f"verify {split}: {report.problems[:3]}")
    _done("encode", timings)
    return [f"data.path={out / 'shards' / 'train'}", f"data.holdout_path={out / 'shards' / 'holdout'}",
            f"data.clip_frames={CLIP_FRAMES}"]


def run(out: Path, scale: DemoScale, extra_overrides: list[str] | None = None) -> dict:
    timings: dict[str, float] = {}
    data_overrides = prepare_shards(out, scale, timings)
    _stage("train", timings)
    from scd_train.trainer import Trainer

    overrides = [*data_overrides, f"train.run_dir={out / 'run'}", f"train.steps={scale.train_steps}",
                 f"train.checkpoint_every={scale.train_steps}", "log.wandb=disabled",
                 f"log.progress_bar={'true' if scale.progress else 'false'}", *(extra_overrides or [])]
    cfg = load_config(CONFIG, overrides)
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
    finally:
        trainer.runtime.shutdown()
    _done("train", timings)

    _stage("sample", timings)
    from scd_train.eval.next_frame import next_frame_score
    from scd_train.sample import SampleRequest, rollout_clips, write_samples
    from scd_train.weights import load_model

    model, cfg = load_model(out / "run", use_ema=True)
    request = SampleRequest(clips=scale.sample_clips, context=scale.context, unroll=scale.unroll)
    batch, rollout, codec = rollout_clips(model, cfg, request)
    paths = write_samples(batch.latents, rollout, codec, scale.context, out / "run" / "samples", batch.keys)
    score = next_frame_score(model, cfg, clips=scale.sample_clips, context=scale.context,
                             steps=cfg.diffusion.sample_steps)
    _done("sample", timings)
    summary = {"final_loss": result.losses[-1][1] if result.losses else None, "steps": result.step,
               "next_frame_psnr": score.model_psnr, "copy_last_psnr": score.copy_last_psnr,
               "samples": [str(p) for p in paths if p.suffix == ".mp4"], "seconds": timings}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out/shards_demo"))
    parser.add_argument("--videos", type=int, default=DemoScale.videos)
    parser.add_argument("--vae-steps", type=int, default=DemoScale.vae_steps)
    parser.add_argument("--train-steps", type=int, default=DemoScale.train_steps)
    parser.add_argument("overrides", nargs="*", help="dotted training-config overrides, e.g. data.source=mds")
    args = parser.parse_args(argv)
    scale = DemoScale(videos=args.videos, vae_steps=args.vae_steps, train_steps=args.train_steps)
    summary = run(args.out, scale, args.overrides)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in summary["seconds"].items())
    print(f"done in {sum(summary['seconds'].values()):.0f}s ({stages}); next-frame PSNR "
          f"{summary['next_frame_psnr']:.1f} dB vs copy-last {summary['copy_last_psnr']:.1f} dB")
    for path in summary["samples"]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
