"""``scd-probe``: feature-similarity and attention probes of a trained dense causal model.

    scd-probe runs/dense --clips 2 --context 8 --steps 20

Writes ``probes.json`` and ``feature_similarity.png``, ``depth_curves.png``, ``attention_maps.png``
under --out (default: <run directory>/probes) and logs the plots to wandb (offline by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from scd_train.cli import command
from scd_train.config import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scd-probe", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="dense model run directory or exported .safetensors")
    p.add_argument("--checkpoint", help="checkpoint directory (default: newest complete)")
    p.add_argument("--raw", action="store_true", help="use raw weights instead of the EMA")
    p.add_argument("--clips", type=int, default=2, help="held-out clips averaged over")
    p.add_argument("--context", type=int, default=8, help="context frames before the probed frame")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's diffusion.sample_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument("--wandb-project", default="scd-train")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from scd_train.eval.clips import holdout_eval_clips, stack_clips
    from scd_train.eval.probe_plots import write_probe_plots
    from scd_train.eval.probes import probe_dense_model
    from scd_train.eval.report import log_to_wandb, write_json
    from scd_train.parallel.runtime import check_device_option
    from scd_train.weights import load_model

    if args.context < 1 or args.clips < 1:
        raise ConfigError(f"--context={args.context} and --clips={args.clips} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps={args.steps} must be >= 1")
    check_device_option(args.device)
    model, cfg = load_model(args.source, args.checkpoint, use_ema=not args.raw, device=args.device)
    if args.context + 1 > cfg.model.max_frames:
        raise ConfigError(f"--context {args.context} + the probed frame = {args.context + 1} frames exceed the "
                          f"model's model.max_frames={cfg.model.max_frames}")
    if cfg.model.arch != "causal_dit":
        raise ConfigError(f"{args.source} holds a model.arch={cfg.model.arch!r} model; the probes need the dense "
                          "causal baseline (model.arch='causal_dit')")
    # the probes recompute attention with boolean masks; a no-op for the probed single-frame steps
    model.cfg = dataclasses.replace(model.cfg, attention="sdpa")
    clips, _ = holdout_eval_clips(cfg, args.context + 1, args.clips)
    latents, actions = stack_clips(clips, args.context + 1)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    result = probe_dense_model(model, latents[:, :args.context].to(args.device), actions,
                               args.steps or cfg.diffusion.sample_steps, cfg.diffusion.num_train_timesteps, generator)
    out = args.out or (args.source if args.source.is_dir() else args.source.parent) / "probes"
    summary = {"source": str(args.source), "clips": [c.key for c in clips], **result.summary()}
    write_json(summary, out / "probes.json")
    plots = write_probe_plots(result, out)
    share = summary["attention_to_earlier_frames"]["mean_over_steps"]
    sim = summary["feature_similarity"]["mean_across_steps"]
    print("layer  feature-similarity  attention-to-earlier-frames")
    for i, (s, a) in enumerate(zip(sim, share)):
        print(f"{i:5d}  {s:18.4f}  {a:27.4f}")
    scalars = {f"probe/layer_{i:02d}/{k}": v for i, (s, a) in enumerate(zip(sim, share))
               for k, v in (("feature_similarity", s), ("attention_to_earlier", a))}
    log_to_wandb(args.wandb, out, args.wandb_project, f"probe-{out.parent.name}", {"source": str(args.source)},
                 scalars, [("image", f"probe/{p.stem}", p) for p in plots])
    print(f"wrote {out / 'probes.json'}")
    return 0


@command("scd-probe")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
