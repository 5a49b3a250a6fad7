"""``scd-eval``: score SCD and the dense baseline side by side on held-out clips.

    scd-eval --scd runs/scd --baseline runs/dense --preset tiny
    scd-eval --scd runs/scd_m --baseline runs/dit_m --preset minecraft-official \\
        --lpips-backbone weights/alexnet-owt-7be5be79.pth --fvd-i3d weights/i3d_torchscript.pt

Writes ``eval.json``, ``samples/grid.{mp4,gif}`` and ``samples/contact_sheet.png`` under --out
(default: <first model's run directory>/eval), prints a table and logs to wandb (offline unless
told otherwise). LPIPS and FVD are computed only when their weight files are given.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scd_train.cli import command
from scd_train.config import Config, to_dict
from scd_train.errors import InputError, ScdWarning
from scd_train.eval.protocol import PRESETS, EvalProtocol, build_protocol

if TYPE_CHECKING:
    from scd_train.eval.evaluate import Candidate

PROTOCOL_FLAGS = ("context", "unroll", "trajectories", "clips", "batch_clips", "steps", "cfg_scale", "seed",
                  "compat", "mp4_crf", "horizons", "compile")


class EvalInputError(InputError):
    """Bad command-line input: reported as one line and exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scd-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--scd", type=Path, help="SCD run directory or exported .safetensors")
    p.add_argument("--baseline", type=Path, help="dense baseline run directory or exported .safetensors")
    p.add_argument("--raw", action="store_true", help="use raw weights instead of the EMA")
    p.add_argument("--allow-mixed-history", action="store_true",
                   help="compare models trained on different kinds of history (model.encoder_input)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="tiny; minecraft (the paper's settings); minecraft-official (plus the reference quirks)")
    defaults = EvalProtocol()
    p.add_argument("--horizons", type=_int_list, default=None,
                   help="generated-frame indices, e.g. 1,4,8,16: PSNR and SSIM at each (eval.json by_horizon)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="the decoder loop (default: each model's diffusion.sample_compile; auto = on CUDA only)")
    for name in PROTOCOL_FLAGS:
        if name in ("horizons", "compile"):
            continue
        kind = type(getattr(defaults, name)) if getattr(defaults, name) is not None else (
            float if name == "cfg_scale" else int)
        extra = {"choices": ["none", "official"]} if name == "compat" else {}
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"override the preset's {name}", **extra)
    p.add_argument("--lpips-backbone", type=Path, help="torchvision state dict of the LPIPS backbone")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg", "squeeze"])
    p.add_argument("--fvd-i3d", type=Path, help="TorchScript I3D feature network for FVD")
    p.add_argument("--sheet-clips", type=int, default=4, help="clips shown in the sample sheets")
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument("--wandb-project", default="scd-train")
    return p.parse_args(argv)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,4,8") from None


def load_feature_networks(args: argparse.Namespace, protocol: EvalProtocol):
    from scd_train.eval.evaluate import FeatureNetworks
    from scd_train.eval.feature_metrics import LPIPS, VideoFeatures

    lpips = (LPIPS(args.lpips_backbone, args.lpips_net, protocol.official, args.device)
             if args.lpips_backbone else None)
    fvd = VideoFeatures(args.fvd_i3d, args.device) if args.fvd_i3d else None
    if fvd is not None and protocol.clips < 2:
        raise EvalInputError(f"FVD needs at least 2 clips, eval.clips={protocol.clips}")
    return FeatureNetworks(lpips, fvd)


def load_candidates(args: argparse.Namespace, protocol: EvalProtocol):
    from scd_train.eval.evaluate import Candidate
    from scd_train.weights import load_model

    candidates = []
    for name, source in (("scd", args.scd), ("baseline", args.baseline)):
        if source is None:
            continue
        model, cfg = load_model(source, use_ema=not args.raw, device=args.device)
        if protocol.frames > cfg.model.max_frames and cfg.model.encoder_window is None:
            raise EvalInputError(f"{source}: context + unroll = {protocol.frames} frames exceed its "
                                 f"model.max_frames={cfg.model.max_frames} (it has no model.encoder_window "
                                 "to stream past it)")
        scales = guidance_scales(cfg, protocol)
        for scale in scales:
            label = name if len(scales) == 1 else f"{name}@cfg{scale:g}"
            candidates.append(Candidate(label, model, cfg, str(source), scale))
    check_same_history(candidates, args.allow_mixed_history)
    shapes = {(c.cfg.model.latent_channels, c.cfg.model.latent_height, c.cfg.model.latent_width) for c in candidates}
    if len(shapes) > 1:
        raise EvalInputError(f"the models expect different latent shapes {sorted(shapes)}; they cannot share clips")
    return candidates


def guidance_scales(cfg: Config, protocol: EvalProtocol) -> list[float]:
    """--cfg-scale when given, else the run's diffusion.eval_cfg_scales, else its cfg_scale."""
    if protocol.cfg_scale is not None:
        return [protocol.cfg_scale]
    return list(cfg.diffusion.eval_cfg_scales or [cfg.diffusion.cfg_scale])


def check_same_history(candidates: list[Candidate], allow_mixed: bool) -> None:
    """A side by side is like for like only if both models read the same kind of history in training."""
    kinds = {}
    for cand in candidates:
        kinds.setdefault(cand.history, cand.source)
    if len(kinds) > 1 and not allow_mixed:
        described = " but ".join(f"{source} trained on {kind} history" for kind, source in kinds.items())
        raise EvalInputError(f"{described} (model.encoder_input); retrain one so both match, or pass "
                             "--allow-mixed-history to compare them anyway")


def default_out(source: Path) -> Path:
    return (source if source.is_dir() else source.parent) / "eval"


def run(args: argparse.Namespace) -> int:
    from scd_train.eval.clips import holdout_eval_clips
    from scd_train.eval.evaluate import evaluate
    from scd_train.eval.report import flat_scalars, log_to_wandb, print_table, write_json
    from scd_train.eval.sheets import write_contact_sheet, write_grid_videos
    from scd_train.parallel.runtime import check_device_option

    if args.scd is None and args.baseline is None:
        raise EvalInputError("give --scd and/or --baseline (a run directory or an exported .safetensors)")
    if args.sheet_clips < 0:
        raise EvalInputError(f"--sheet-clips {args.sheet_clips} must be >= 0")
    check_device_option(args.device)
    protocol = build_protocol(args.preset, {n: getattr(args, n) for n in PROTOCOL_FLAGS})
    nets = load_feature_networks(args, protocol)
    candidates = load_candidates(args, protocol)
    clips, decode = holdout_eval_clips(candidates[0].cfg, protocol.frames, protocol.clips)
    if len(clips) < protocol.clips:
        warnings.warn(f"the protocol asks for {protocol.clips} clips but the held-out data provides "
                      f"{len(clips)}; evaluating {len(clips)}", ScdWarning, stacklevel=1)
    result = evaluate(candidates, clips, decode, protocol, nets, args.sheet_clips, args.device,
                      progress=lambda n: print(f"evaluated {n}/{len(clips)} clips", file=sys.stderr))
    data = result.to_json()
    out = args.out or default_out(args.scd or args.baseline)
    write_json(data, out / "eval.json")
    media = []
    if args.sheet_clips > 0:
        sheet = result.sheet
        mp4, gif = write_grid_videos(sheet.truth, sheet.samples, protocol.context, out / "samples")
        png = write_contact_sheet(sheet.truth, sheet.samples, protocol.context, out / "samples" / "contact_sheet.png")
        media = [("video", "eval/samples", mp4), ("image", "eval/contact_sheet", png)]
    print_table(data)
    config = {"protocol": data["protocol"], "sources": data["sources"],
              "models": {c.name: to_dict(c.cfg)["model"] for c in candidates}}
    log_to_wandb(args.wandb, out, args.wandb_project, f"eval-{out.parent.name}", config, flat_scalars(data), media)
    print(f"wrote {out / 'eval.json'}")
    return 0


@command("scd-eval")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
