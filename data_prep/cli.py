"""Command line: ``scd-data synth | train-vae | encode | verify`` (also ``python -m data_prep``).

    scd-data synth --out data/videos --num-videos 256 --frames 32 --size 64
    scd-data train-vae data/videos/train --out data/vae --steps 400
    scd-data encode data/videos/train --vae data/vae --out data/shards --clip-frames 16 --stride 8
    scd-data verify data/shards
    scd-data encode ... --out s3://bucket/latents/train     # endpoint and credentials: AWS_* variables
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scd_train.cli import run_cli

SUBCOMMANDS = ("synth", "train-vae", "encode", "verify")


def _synth(args: argparse.Namespace) -> int:
    from data_prep.checks import check_synth_options
    from data_prep.synth import write_synthetic
    from scd_train.config import SyntheticDataConfig

    cfg = SyntheticDataConfig(num_videos=args.num_videos, frames_per_video=args.frames, image_size=args.size,
                              digit_scale=args.digit_scale, digits_per_video=args.digits, speed=args.speed,
                              holdout_fraction=args.holdout_fraction)
    check_synth_options(args.out, cfg, args.seed, args.fps)
    result = write_synthetic(args.out, cfg, args.seed, args.fps, progress=not args.quiet)
    print(f"synth: {result['train_videos']} train + {result['holdout_videos']} held-out videos in {args.out} "
          f"({result['written']} written, {result['kept']} already present)")
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from data_prep.train_vae import VaeTrainOptions, train_vae

    opts = VaeTrainOptions(args.videos, args.out, size=args.size, latent_channels=args.latent_channels,
                           compression=args.compression, base_channels=args.base_channels, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, overwrite=args.overwrite,
                           progress=not args.quiet)
    report = train_vae(opts)
    print(f"train-vae: {report['steps']} steps in {report['seconds']:.0f}s on {report['frames']} frames, "
          f"reconstruction PSNR {report['psnr_db']:.1f} dB; saved {args.out}")
    for line in report["unreadable_inputs"]:
        print(f"  unreadable: {line}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from data_prep.encode import EncodeOptions, encode

    height, width = args.size
    opts = EncodeOptions(args.inputs, args.out, args.vae, formats=args.format.split(","), height=height,
                         width=width, clip_frames=args.clip_frames, stride=args.stride,
                         videos_per_shard=args.videos_per_shard, dtype=args.dtype, normalization=args.normalization,
                         num_actions=args.num_actions, default_fps=args.fps, workers=args.workers,
                         device=args.device, strict=args.strict, overwrite=args.overwrite, progress=not args.quiet,
                         resample_fps=args.resample_fps, allow_mixed_fps=args.allow_mixed_fps,
                         staging=args.staging, retries=args.retries, retry_delay_s=args.retry_delay)
    summary = encode(opts)
    print(f"encode: {summary.videos} videos -> {summary.clips} clips; {summary.jobs_done} shard job(s) run, "
          f"{summary.jobs_reused} already complete; {summary.frames_encoded} frames in {summary.seconds:.1f}s "
          f"({summary.frames_per_second:.1f} frames/s)")
    if summary.bad:
        print(f"  {len(summary.bad)} bad input(s) skipped:")
        for bad in summary.bad:
            print(f"    {bad['input']}: {bad['reason']}")
    print(f"  manifest: {summary.manifest}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_prep.checks import check_retry_options
    from data_prep.verify import verify
    from scd_train.storage import RetryPolicy

    check_retry_options(args.retries, args.retry_delay)
    report = verify(args.root, args.format.split(",") if args.format else None, progress=not args.quiet,
                    retry=RetryPolicy(args.retries, args.retry_delay))
    for problem in report.problems:
        print(f"  {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"verify: {report.shards} shards, {report.samples} samples read: {status}")
    if args.json:
        print(json.dumps({"shards": report.shards, "samples": report.samples, "problems": report.problems}))
    return 0 if report.ok else 1


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or HxW") from None
    return height, width


def _retry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retries", type=int, default=5,
                   help="s3://: tries per request on transient failures (connection, timeout, throttling, 5xx)")
    p.add_argument("--retry-delay", type=float, default=0.5, help="s3://: first wait in seconds, doubling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scd-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the moving-digits videos (mp4) with per-frame action files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-videos", type=int, default=256)
    p.add_argument("--frames", type=int, default=32, help="frames per video")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--digit-scale", type=int, default=4)
    p.add_argument("--digits", type=int, default=1, help="digits per video")
    p.add_argument("--speed", type=int, default=3, help="pixels moved per frame")
    p.add_argument("--holdout-fraction", type=float, default=0.125)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_synth)

    p = sub.add_parser("train-vae", help="train the small KL autoencoder and save it in diffusers format")
    p.add_argument("videos", type=Path, help="folder of videos, image folders or .npy arrays")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=64, help="square training crop")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--compression", type=int, default=8, help="spatial compression (power of two)")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_train_vae)

    p = sub.add_parser("encode", help="encode videos into latent clips in webdataset and/or MDS shards")
    p.add_argument("inputs", type=Path, help="folder of .mp4/.webm/.avi files, PNG/JPG frame folders, .npy arrays")
    p.add_argument("--vae", type=Path, required=True, help="local diffusers VAE folder (AutoencoderKL/DC)")
    p.add_argument("--out", required=True, help="output directory, or an s3://bucket/prefix URL")
    p.add_argument("--format", default="webdataset,mds", help="webdataset, mds, or webdataset,mds")
    p.add_argument("--size", type=_size, default=(64, 64), help="target frame size N or HxW (resize + crop)")
    p.add_argument("--clip-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=8, help="frames between clip starts")
    p.add_argument("--videos-per-shard", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored latent dtype")
    p.add_argument("--normalization", default="channel_stats", choices=["channel_stats", "scaling_factor"])
    p.add_argument("--num-actions", type=int, help="action classes (default: largest id + 1)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of image folders and arrays")
    p.add_argument("--resample-fps", type=float, help="resample every input to this frame rate (nearest frame)")
    p.add_argument("--allow-mixed-fps", action="store_true",
                   help="keep inputs of different frame rates as they are (refused otherwise)")
    p.add_argument("--workers", type=int, help="processes (default: all cores on CPU, 1 on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--strict", action="store_true", help="fail (no manifest) if any input is bad")
    p.add_argument("--overwrite", action="store_true", help="discard shards made with other inputs or options")
    p.add_argument("--staging", type=Path, help="s3:// --out: local directory for a job's files before upload "
                                                "(default: a temporary directory)")
    _retry_options(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_encode)

    p = sub.add_parser("verify", help="check shards against the manifest")
    p.add_argument("root", help="shard directory, or an s3://bucket/prefix URL")
    p.add_argument("--format", help="only this format (default: all in the manifest)")
    p.add_argument("--json", action="store_true", help="also print a JSON summary")
    _retry_options(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_verify)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    """Errors read ``scd-data <subcommand>: message`` (see ``scd_train.cli``)."""
    words = sys.argv[1:] if argv is None else argv
    sub = next((w for w in words if not w.startswith("-")), None)
    return run_cli(f"scd-data {sub}" if sub in SUBCOMMANDS else "scd-data", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
