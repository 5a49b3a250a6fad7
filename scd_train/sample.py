"""``scd-sample``: stream continuations of held-out clips and write them as mp4 and gif.

    scd-sample runs/tiny --clips 4 --context 4 --unroll 12 --steps 20 --out runs/tiny/samples
    scd-sample runs/windowed --clips 1 --unroll 2000 --compile on     # past max_frames: needs a window

Each output shows ground truth | generated side by side; generated frames have a red border.
A model trained with ``model.encoder_window`` streams for ever at constant memory: ``--unroll``
may exceed both ``model.max_frames`` and the held-out clips, whose ground truth then ends (black
frames) and whose recorded actions are continued by uniformly random ones drawn from ``--seed``.
A full-history model refuses a rollout longer than ``model.max_frames``, naming both numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scd_train.cli import command
from scd_train.data.holdout import holdout_clip_frames, holdout_clips
from scd_train.diffusion.sampling import Rollout, check_rollout_length, generate, settings_from_config
from scd_train.errors import InputError
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
    # decoder loop: auto / on / off; None uses diffusion.sample_compile
    compile: str | None = None

    def check(self) -> None:
        """Refuse requests that cannot produce what they ask for, before any model is loaded."""
        for name in ("clips", "context", "unroll"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} {getattr(self, name)} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps {self.steps} must be at least 1 (0 would return pure noise)")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise InputError(f"--cfg-scale {self.cfg_scale} must be >= 0")

    def check_model(self, cfg) -> None:
        """Refuse requests the model cannot serve (positional range, guidance it has no branch for)."""
        frames = self.context + self.unroll
        if cfg.model.encoder_window is None and frames > cfg.model.max_frames:  # a windowed model streams on
            raise InputError(f"--context {self.context} + --unroll {self.unroll} = {frames} frames exceed the model's "
                             f"model.max_frames={cfg.model.max_frames}; ask for at most {cfg.model.max_frames} frames, "
                             "or use a model trained with model.encoder_window set")
        scale = cfg.diffusion.cfg_scale if self.cfg_scale is None else self.cfg_scale
        mode = self.cfg_mode or cfg.diffusion.cfg_mode
        if scale != 1.0 and mode == "decoder" and cfg.model.arch == "causal_dit":
            raise InputError("--cfg-mode decoder: the dense baseline has no encoder context to perturb; "
                             "use --cfg-mode action")
        if scale != 1.0 and mode == "action" and cfg.model.num_actions == 0:
            raise InputError("--cfg-mode action needs an action-conditioned model (this one has model.num_actions=0)")


def rollout_clips(model, cfg, request: SampleRequest, device: torch.device | str = "cpu"):
    """Generate continuations of the first ``request.clips`` held-out clips.

    Returns (ground-truth latents, rollout, codec); the ground truth covers at most the held-out
    clips' length, which a windowed model's rollout may run past.
    """
    check_rollout_length(model, request.context, request.unroll)
    available = holdout_clip_frames(cfg)
    if request.context > available:
        raise InputError(f"--context {request.context} needs held-out clips of at least {request.context} frames; "
                         f"the held-out data has clips of {available}")
    frames = min(request.context + request.unroll, available)
    clips, codec = holdout_clips(cfg, frames)
    if request.clips > len(clips):
        from scd_train.data.shards import MAX_HOLDOUT_CLIPS

        cap = f" (at most {MAX_HOLDOUT_CLIPS} are read)" if len(clips) == MAX_HOLDOUT_CLIPS else ""
        raise InputError(f"--clips {request.clips}: the held-out data provides {len(clips)} clips of "
                         f"{frames} frames{cap}; ask for at most {len(clips)}")
    batch = clips.collate(list(range(request.clips)))
    settings = settings_from_config(cfg.diffusion, request.steps, request.cfg_scale, request.cfg_mode,
                                    request.compile)
    generator = torch.Generator(device=device).manual_seed(request.seed)
    actions = None if batch.actions is None else continued_actions(batch.actions, request.context + request.unroll,
                                                                   cfg.model.num_actions, request.seed).to(device)
    rollout = generate(model, batch.latents[:, : request.context].to(device), actions, request.unroll, settings,
                       generator)
    return batch, rollout, codec


def continued_actions(actions: torch.Tensor, frames: int, num_actions: int, seed: int) -> torch.Tensor:
    """(B, frames) actions: the recorded ones, then uniformly random ones from ``seed``."""
    missing = frames - actions.shape[1]
    if missing <= 0:
        return actions[:, :frames]
    extra = torch.randint(0, num_actions, (actions.shape[0], missing), generator=torch.Generator().manual_seed(seed))
    return torch.cat([actions, extra.to(actions.dtype)], dim=1)


def write_samples(truth_latents: torch.Tensor, rollout: Rollout, codec, context: int, out_dir: Path,
                  keys: list[str], scale: int | None = None, fps: int = 6) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    truth = codec.decode(truth_latents.cpu())
    generated = codec.decode(rollout.frames.cpu())
    scale = scale or max(1, 128 // truth.shape[-1])  # small frames are enlarged to be watchable
    for i, key in enumerate(keys):
        gt = upscale(to_hwc_uint8(truth[i]), scale)
        if gt.shape[0] < generated.shape[1]:  # the rollout ran past the ground truth: black frames
            gt = np.concatenate([gt, np.zeros((generated.shape[1] - gt.shape[0], *gt.shape[1:]), gt.dtype)])
        gen = mark_generated(upscale(to_hwc_uint8(generated[i]), scale), context)
        panel = side_by_side([gt, gen])
        stem = out_dir / f"sample_{i:03d}"
        written += [write_mp4(panel, stem.with_suffix(".mp4"), fps), write_gif(panel, stem.with_suffix(".gif"), fps)]
        (stem.with_suffix(".json")).write_text(json.dumps({"clip": key, "context_frames": context}))
    return written


@command("scd-sample")
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
    parser.add_argument("--compile", choices=["auto", "on", "off"],
                        help="compile the decoder loop (default: the run's diffusion.sample_compile; "
                             "auto = on CUDA only); off runs it eagerly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="default: <run_dir>/samples")
    args = parser.parse_args(argv)
    from scd_train.parallel.runtime import check_device_option
    from scd_train.weights import load_model

    request = SampleRequest(args.clips, args.context, args.unroll, args.steps, args.cfg_scale, args.cfg_mode,
                            args.seed, args.compile)
    request.check()
    check_device_option(args.device)
    model, cfg = load_model(args.source, args.checkpoint, use_ema=not args.raw, device=args.device)
    request.check_model(cfg)
    batch, rollout, codec = rollout_clips(model, cfg, request, args.device)
    out = args.out or (args.source if args.source.is_dir() else args.source.parent) / "samples"
    paths = write_samples(batch.latents, rollout, codec, args.context, out, batch.keys)
    print(f"{len(batch.keys)} clips, {args.unroll} frames each: first frame {rollout.first_frame_seconds:.3f}s, "
          f"then {rollout.steady_frame_seconds:.3f}s/frame (median)")
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
