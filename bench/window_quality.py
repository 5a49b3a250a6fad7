"""Quality past the window: a windowed tiny SCD and its full-history twin, PSNR by horizon.

    python bench/window_quality.py                       # trains both side by side (minutes on 2 cores), evaluates
    python bench/window_quality.py --runs /tmp/wq        # where the two run directories go (reused if complete)

Both models train on the embedded moving digits with configs/tiny.yaml (8-frame clips) for the
same steps from the same seed; one has ``model.encoder_window`` shorter than the clip (3 frames
plus 1 sink by default). ``scd-eval --horizons`` then rolls both out on the same held-out clips
with the same seeds (2 context + 22 generated frames) and scores each generated frame on its own,
so the PSNR before the window drops any history (horizon < W + S + 2 - context) reads beside the PSNR long
after it. The same measurement on other data is one ``scd-eval`` command (see docs/streaming.md).
JSON goes to bench/results/window_quality_tiny.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scd_train.env import library_versions
from scd_train.eval.report import write_json
from scd_train.metrics.timing import MachineLoad

CONTEXT, UNROLL = 2, 22  # 24 frames: the held-out videos' length
HORIZONS = [1, 2, 3, 4, 6, 8, 12, 16, 22]


def start_training(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """One training process on one thread: the two runs share a 2-core machine side by side. A run
    directory whose checkpoints already reach the steps resumes to nothing and exits at once."""
    cmd = [sys.executable, "-m", "scd_train.train", "--config", "configs/tiny.yaml", *overrides,
           f"train.run_dir={run_dir}", "log.progress_bar=false", "log.wandb=disabled"]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def reference_psnr(run_dir: Path, clips: int) -> dict[str, dict[str, float]]:
    """PSNR by horizon of two trivial predictions on the same clips: the last context frame, and black."""
    from scd_train.config import load_config
    from scd_train.eval.clips import holdout_eval_clips, stack_clips
    from scd_train.eval.metrics import per_frame_mse, psnr_from_mse

    eval_clips, decode = holdout_eval_clips(load_config(run_dir / "config.yaml"), CONTEXT + UNROLL, clips)
    pixels = decode(stack_clips(eval_clips, CONTEXT + UNROLL)[0])
    out: dict[str, dict[str, float]] = {"copy_last_context_frame": {}, "black_frame": {}}
    for h in HORIZONS:
        truth, last = pixels[:, CONTEXT + h - 1], pixels[:, CONTEXT - 1]
        out["copy_last_context_frame"][str(h)] = float(psnr_from_mse(per_frame_mse(last, truth).mean()))
        out["black_frame"][str(h)] = float(psnr_from_mse(per_frame_mse(torch.zeros_like(truth), truth).mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/window_quality"))
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--sinks", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/window_quality_tiny.json"))
    args = parser.parse_args(argv)
    load_before = MachineLoad.now()
    common = [f"train.steps={args.train_steps}", f"data.batch_size={args.batch_size}"]
    windowed, full = args.runs / "windowed", args.runs / "full"
    runs = [start_training(windowed, [*common, f"model.encoder_window={args.window}",
                                      f"model.encoder_sink_frames={args.sinks}"]),
            start_training(full, common)]
    if any(run.wait() != 0 for run in runs):
        raise SystemExit("training failed; see the output above")
    eval_dir = args.runs / "eval"
    subprocess.run([sys.executable, "-m", "scd_train.eval.cli", "--scd", str(windowed), "--baseline", str(full),
                    "--preset", "tiny", "--context", str(CONTEXT), "--unroll", str(UNROLL), "--clips", str(args.clips),
                    "--trajectories", "2", "--batch-clips", "8", "--steps", "20",
                    "--horizons", ",".join(map(str, HORIZONS)), "--sheet-clips", "4", "--wandb", "disabled",
                    "--compile", "off", "--out", str(eval_dir)], check=True)
    result = json.loads((eval_dir / "eval.json").read_text())
    models = {"windowed": result["models"]["scd"], "full_history": result["models"]["baseline"]}
    report = {
        "benchmark": "window_quality",
        "date": datetime.date.today().isoformat(),
        "settings": {"config": "configs/tiny.yaml", "train_steps": args.train_steps, "batch_size": args.batch_size,
                     "clip_frames": 8, "encoder_window": args.window, "encoder_sink_frames": args.sinks,
                     "context": CONTEXT, "unroll": UNROLL, "clips": result["clips_evaluated"], "trajectories": 2,
                     "sample_steps": 20,
                     # generated frame context + h - 1 is rendered from encoder frame context + h - 2,
                     # whose window drops history once that frame index reaches sinks + window
                     "first_horizon_past_the_window": args.window + args.sinks + 2 - CONTEXT},
        "final_loss": {name: _final_loss(path) for name, path in (("windowed", windowed), ("full_history", full))},
        "psnr_by_horizon": {name: dict(zip(map(str, m["by_horizon"]["horizons"]), m["by_horizon"]["psnr"]))
                            for name, m in models.items()},
        "ssim_by_horizon": {name: dict(zip(map(str, m["by_horizon"]["horizons"]), m["by_horizon"]["ssim"]))
                            for name, m in models.items()},
        "psnr_all_generated_frames": {name: m["metrics"]["psnr"] for name, m in models.items()},
        "reference_psnr_by_horizon": reference_psnr(full, args.clips),
        "machine_load": {"before": load_before.to_dict(), "after": MachineLoad.now().to_dict()},
        "versions": library_versions(),
    }
    write_json(report, args.out)  # atomic: a killed run never leaves half a file
    for name in ("windowed", "full_history"):
        row = report["psnr_by_horizon"][name]
        print(f"{name:13s} " + "  ".join(f"+{h}: {v:5.2f}" for h, v in row.items()))
    print(f"wrote {args.out}")
    return 0


def _final_loss(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().strip().splitlines()
    return json.loads(lines[-1])["loss"]


if __name__ == "__main__":
    sys.exit(main())
