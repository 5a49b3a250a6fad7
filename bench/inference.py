"""Streaming inference: SCD against the dense causal baseline at matched width and total depth.

    python bench/inference.py                       # CPU, small dims (minutes on 2 cores)
    python bench/inference.py --preset scd_m        # GPU, the paper's SCD-M dims, bf16

Both models get the same context, steps, guidance and random weights (speed does not depend on
what the weights learned). For each context length it reports first-frame latency, median
per-frame latency after the first, frames/s, the SCD/baseline speed ratio, model calls per frame and
analytic FLOPs per frame. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from scd_train.config import load_config
from scd_train.env import library_versions
from scd_train.eval.speed import SpeedSettings, compare_speed, paired_configs
from scd_train.models import build_model

PRESETS = {
    # CPU-sized: width 256, SCD 4 + 2 layers against a dense 6-layer stack.
    "small": {"config": "configs/tiny.yaml", "overrides": ["model.width=256", "model.num_heads=4",
                                                           "model.head_dim=64", "model.rope_axes=[16,24,24]",
                                                           "model.max_frames=300"]},
    "scd_m": {"config": "configs/scd_m.yaml", "overrides": []},
}


def run(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    cfg = load_config(preset["config"], preset["overrides"] + args.override)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if (args.bf16 or device.type == "cuda") else torch.float32
    longest = max(args.contexts) + args.unroll
    if longest > cfg.model.max_frames:
        raise SystemExit(f"context {max(args.contexts)} + unroll {args.unroll} exceeds model.max_frames="
                         f"{cfg.model.max_frames}; pass model.max_frames=<n> as an override")
    scd_cfg, dense_cfg = paired_configs(cfg)
    torch.manual_seed(0)
    models = {"scd": build_model(scd_cfg.model).to(device).eval(),
              "causal_dit": build_model(dense_cfg.model).to(device).eval()}
    rows = []
    for context in args.contexts:
        settings = SpeedSettings(context, args.unroll, args.steps, args.guided, args.batch)
        row = compare_speed(models["scd"], models["causal_dit"], scd_cfg, dense_cfg, settings, dtype)
        rows.append(row)
        print(f"context {context:4d}: SCD {row['scd']['frame_s_median'] * 1e3:8.1f} ms/frame, baseline "
              f"{row['causal_dit']['frame_s_median'] * 1e3:8.1f} ms/frame, speedup {row['speedup']:.2f}x",
              flush=True)
    return {
        "benchmark": "inference",
        "date": datetime.date.today().isoformat(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "dtype": str(dtype).removeprefix("torch."),
        "preset": args.preset,
        "settings": {"steps": args.steps, "unroll": args.unroll, "batch": args.batch, "guided": args.guided},
        "model": {"width": cfg.model.width, "encoder_layers": cfg.model.encoder_layers,
                  "decoder_layers": cfg.model.decoder_layers, "dense_layers": dense_cfg.model.layers,
                  "tokens_per_frame": (cfg.model.latent_height // cfg.model.patch_size)
                  * (cfg.model.latent_width // cfg.model.patch_size)},
        "versions": library_versions(),
        "results": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--unroll", type=int, default=6, help="frames generated per measurement")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per frame")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guided", action="store_true", help="classifier-free guidance (2 branches)")
    parser.add_argument("--device")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/inference-<preset>-<device>.json)")
    parser.add_argument("override", nargs="*", help="dotted config overrides, e.g. model.width=512")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    kind = "cuda" if report["device"] and not report["device"].startswith("cpu") else "cpu"
    out = args.out or Path("bench/results") / f"inference-{args.preset}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
