"""``scd-sample``: stream continuations of held-out clips and write them as mp4 and gif.

    scd-sample runs/tiny --clips 4 --context 4 --unroll 12 --steps 20 --out runs/tiny/samples

Each output shows ground truth | generated side by side; generated frames have a red border.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from scd_train.config import ConfigError
from scd_train.data.holdout import holdout_clips
from scd_train.diffusion.sampling import Rollout, generate, settings_from_config
from scd_train.video import mark_generated, side_by_side, to_hwc_uint8, upscale, write_gif, write_mp4


@dataclass
class SampleRequest:
    clips: int = 4
    context: int = 4
    unroll: int = 8
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_mode: str | None = None
    seed: int = 0


def rollout_clips(model, cfg, request: SampleRequest, device: torch.device | str = "cpu"):
    """Generate continuations of the first ``request.clips`` held-out clips.

    Returns (ground-truth latents, rollout, codec).
    """
    clips, codec = holdout_clips(cfg, request.context + request.unroll)
    count = min(request.clips, len(clips))
    batch = clips.collate(list(range(count)))
    settings = settings_from_config(cfg.diffusion, request.steps, request.cfg_scale, request.cfg_mode)
    generator = torch.Generator(device=device).manual_seed(request.seed)
    actions = None if batch.actions is None else batch.actions.to(device)
    rollout = generate(model, batch.latents[:, : request.context].to(device), actions, request.unroll, settings,
                       generator)
    return batch, rollout, codec


def write_samples(truth_latents: torch.Tensor, rollout: Rollout, codec, context: int, out_dir: Path,
                  keys: list[str], scale: int | None = None, fps: int = 6) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    truth = codec.decode(truth_latents.cpu())
    generated = codec.decode(rollout.frames.cpu())
    scale = scale or max(1, 128 // truth.shape[-1])  # small frames are enlarged to be watchable
    for i, key in enumerate(keys):
        gt = upscale(to_hwc_uint8(truth[i]), scale)
        gen = mark_generated(upscale(to_hwc_uint8(generated[i]), scale), context)
        panel = side_by_side([gt, gen])
        stem = out_dir / f"sample_{i:03d}"
        written += [write_mp4(panel, stem.with_suffix(".mp4"), fps), write_gif(panel, stem.with_suffix(".gif"), fps)]
        (stem.with_suffix(".json")).write_text(json.dumps({"clip": key, "context_frames": context}))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scd-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run directory or an exported .safetensors file")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: newest complete)")
    parser.add_argument("--raw", action="store_true", help="use raw weights instead of the EMA")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("--unroll", type=int, default=8)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg-scale", type=float)
    parser.add_argument("--cfg-mode", choices=["decoder", "action"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="default: <run_dir>/samples")
    args = parser.parse_args(argv)
    from scd_train.data.manifest import ManifestError
    from scd_train.weights import load_model

    try:
        model, cfg = load_model(args.source, args.checkpoint, use_ema=not args.raw, device=args.device)
    except (FileNotFoundError, KeyError, ConfigError) as exc:
        print(f"scd-sample: {exc}", file=sys.stderr)
        return 2
    request = SampleRequest(args.clips, args.context, args.unroll, args.steps, args.cfg_scale, args.cfg_mode,
                            args.seed)
    try:
        batch, rollout, codec = rollout_clips(model, cfg, request, args.device)
    except ManifestError as exc:  # the run's held-out shards moved or never existed
        print(f"scd-sample: {exc}", file=sys.stderr)
        return 2
    out = args.out or (args.source if args.source.is_dir() else args.source.parent) / "samples"
    paths = write_samples(batch.latents, rollout, codec, args.context, out, batch.keys)
    print(f"{len(batch.keys)} clips, {args.unroll} frames each: first frame {rollout.first_frame_seconds:.3f}s, "
          f"then {rollout.steady_frame_seconds:.3f}s/frame (median)")
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
