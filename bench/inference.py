"""Streaming inference: SCD against the dense causal baseline at matched width and total depth.

    python bench/inference.py                       # CPU, small dims, 1 thread (a few minutes on 2 cores)
    python bench/inference.py --preset scd_m        # GPU, the paper's SCD-M dims, bf16

Both models get the same context, actions, steps, guidance and random weights (speed does not
depend on what the weights learned) and are timed side by side, frame for frame, in an order
that flips every repeat, with process CPU time beside wall time, at a pinned thread count on CPU
(``scd_train.eval.speed`` explains the method). For each context length it reports the prefill
(the pass over the context), the first frame (prefill included, for both models alike) and the
steady per-frame latency as median and minimum over all frames timed, the SCD/baseline ratio of
each by wall median, wall minimum and CPU median, and the analytic FLOP ratio beside them.
Machine load before and after goes into the JSON (bench/results/).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

from scd_train.config import load_config
from scd_train.env import library_versions
from scd_train.eval.report import write_json
from scd_train.eval.speed import SpeedSettings, measure, paired_configs

PRESETS = {
    # CPU-sized: width 256, SCD 4 + 2 layers against a dense 6-layer stack, 16 tokens per frame.
    "small": {"config": "configs/tiny.yaml", "overrides": ["model.width=256", "model.num_heads=4",
                                                           "model.head_dim=64", "model.rope_axes=[16,24,24]",
                                                           "model.max_frames=300"]},
    "scd_m": {"config": "configs/scd_m.yaml", "overrides": []},
}


def phase_line(row: dict, phase: str) -> str:
    scd, dense, r = row["scd"][phase], row["causal_dit"][phase], row["ratios"][phase]
    return (f"{phase:>11}: SCD {scd['wall_s_median'] * 1e3:8.1f} ms (min {scd['wall_s_min'] * 1e3:7.1f}, "
            f"CPU {scd['cpu_s_median'] * 1e3:7.1f})  dense {dense['wall_s_median'] * 1e3:8.1f} ms "
            f"(min {dense['wall_s_min'] * 1e3:7.1f}, CPU {dense['cpu_s_median'] * 1e3:7.1f})  ratio "
            f"{r['wall_median']:.2f}x median, {r['wall_min']:.2f}x min, {r['cpu_median']:.2f}x CPU; "
            f"FLOPs {r['flops']:.2f}x")


def print_row(row: dict) -> None:
    print(f"context {row['context_frames']}:")
    for phase in ("prefill", "first_frame", "frame"):
        print("  " + phase_line(row, phase), flush=True)


def run(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    cfg = load_config(preset["config"], preset["overrides"] + args.override)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if (args.bf16 or device.type == "cuda") else torch.float32
    longest = max(args.contexts) + args.unroll
    if longest > cfg.model.max_frames:
        raise SystemExit(f"context {max(args.contexts)} + unroll {args.unroll} exceeds model.max_frames="
                         f"{cfg.model.max_frames}; pass model.max_frames=<n> as an override")
    if args.unroll < 2 or args.rollouts < 1:
        raise SystemExit("--unroll must be >= 2 (a first and a steady frame) and --rollouts >= 1")
    settings = [SpeedSettings(c, args.rollouts, args.unroll, args.steps, args.guided, args.batch)
                for c in args.contexts]
    report = measure(cfg, settings, device, dtype, threads=args.threads, on_row=print_row)
    _, dense_cfg = paired_configs(cfg)
    m = cfg.model
    return {
        "benchmark": "inference",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/inference.py", *args.argv]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"),
        "dtype": str(dtype).removeprefix("torch."),
        "preset": args.preset,
        "settings": {"steps": args.steps, "rollouts": args.rollouts, "unroll": args.unroll, "batch": args.batch,
                     "guided": args.guided, "steady_frames_per_model": settings[0].steady_frames},
        "model": {"width": m.width, "encoder_layers": m.encoder_layers, "decoder_layers": m.decoder_layers,
                  "dense_layers": dense_cfg.model.layers,
                  "tokens_per_frame": (m.latent_height // m.patch_size) * (m.latent_width // m.patch_size)},
        "versions": library_versions(),
        **report,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per model per context (prefills timed)")
    parser.add_argument("--unroll", type=int, default=8, help="frames generated per rollout (the first + steady)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per frame")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guided", action="store_true", help="classifier-free guidance (2 branches)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for CPU runs, pinned (one thread: no synchronisation stalls when "
                             "other processes share the cores)")
    parser.add_argument("--device")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/inference-<preset>-<device>.json)")
    parser.add_argument("override", nargs="*", help="dotted config overrides, e.g. model.width=512")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    kind = "cpu" if report["device"].startswith("cpu") else "cuda"
    out = args.out or Path("bench/results") / f"inference-{args.preset}-{kind}.json"
    write_json(report, out)  # atomic: a killed run never leaves half a file
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
