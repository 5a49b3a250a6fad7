"""``make demo``: train the tiny SCD on moving digits, then sample, score and time it.

    python -m scd_train.demo                      # the full demo (a few minutes on 2 CPU cores)
    python -m scd_train.demo train.steps=50       # any dotted override of the config
    python -m scd_train.demo --source synthetic   # skip the data pipeline: frames rendered in memory

By default the data goes the way users' data goes: synthetic videos written as mp4, a small VAE
trained on them, clips encoded to latent shards (``scd-data``), then training from the shards and
sampling decoded through the same VAE. Data stages reuse their output in --data-dir when run again.

Writes into the run directory (runs/demo by default): checkpoints, metrics.jsonl, samples/
(mp4 + gif, ground truth | generated), loss_curve.png and demo_summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from scd_train.cli import command
from scd_train.config import Config, load_config
from scd_train.eval.next_frame import next_frame_score
from scd_train.eval.speed import SpeedSettings, measure
from scd_train.sample import SampleRequest, rollout_clips, write_samples
from scd_train.weights import load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIGS = {"shards": CONFIGS / "tiny_shards.yaml", "synthetic": CONFIGS / "tiny.yaml"}


def train(cfg: Config):
    from scd_train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.runtime.shutdown()


def plot_loss_curve(metrics_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("tiny SCD on moving digits")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# CPU results depend on how many threads split each reduction and on the instruction set the CPU
# kernels are chosen for (the same run gives other digits with AVX2 kernels than with AVX-512 ones),
# so the demo pins both: every stage runs at DEMO_THREADS threads with AVX2 kernels on x86.
DEMO_THREADS = 2
X86_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
# The speed rows run at one pinned thread, as bench/inference.py does by default: a thread that
# waits for a busy core at every synchronisation would time the machine's load, not the models.
SPEED_THREADS = 1


def pin_cpu_numerics() -> dict[str, str]:
    """Fix the thread count and, on x86, the kernels' instruction set; returns what was pinned.

    Must run before the first tensor computation: the libraries read these variables when they
    first dispatch a kernel. A variable already set by the user is left as it is.
    """
    pinned = {}
    if platform.machine().lower() in ("x86_64", "amd64"):
        for name, value in X86_KERNELS.items():
            pinned[name] = os.environ.setdefault(name, value)
    torch.set_num_threads(DEMO_THREADS)
    pinned["torch_threads"] = str(torch.get_num_threads())
    return pinned


def measure_speed_ratio(cfg: Config, context: int) -> dict:
    """SCD vs the dense baseline of the same width and total depth, both with fresh weights, timed
    side by side frame for frame (``scd_train.eval.speed``)."""
    settings = SpeedSettings(context=context, rollouts=3, unroll=8, steps=cfg.diffusion.sample_steps)
    report = measure(cfg, [settings], torch.device("cpu"), torch.float32, threads=SPEED_THREADS)
    return {**report["results"][0], "threads": report["threads"], "machine_load": report["machine_load"],
            "history": report["history"]}


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scd-train demo: tiny SCD on moving digits")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("training steps", str(summary["steps"]))
    table.add_row("loss: first logged -> final", f"{summary['loss_initial']:.4f} -> {summary['loss_final']:.4f}")
    score = summary["next_frame"]
    table.add_row(f"next-frame PSNR, SCD ({score['clips']} held-out clips)", f"{score['model_psnr']:.2f} dB")
    table.add_row("next-frame PSNR, copy last context frame", f"{score['copy_last_psnr']:.2f} dB")
    speed = summary["speed"]
    scd, dense, ratio = speed["scd"]["frame"], speed["causal_dit"]["frame"], speed["ratios"]["frame"]
    table.add_row(f"ms/frame SCD vs baseline ({speed['context_frames']} context frames, median of {scd['calls']})",
                  f"{scd['wall_s_median'] * 1e3:.1f} vs {dense['wall_s_median'] * 1e3:.1f}")
    table.add_row("speed ratio SCD / dense baseline: wall | CPU time",
                  f"{ratio['wall_median']:.2f}x | {ratio['cpu_median']:.2f}x")
    table.add_row("FLOP ratio dense baseline / SCD", f"{ratio['flops']:.2f}x")
    table.add_row("run directory", summary["run_dir"])
    Console().print(table)


def holdout_frames(cfg: Config) -> int:
    """Length of the held-out clips: whole synthetic videos, or the clips stored in the held-out shards."""
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic.frames_per_video
    from scd_train.data.manifest import load_manifest

    return load_manifest(cfg.data.holdout_path, "data.holdout_path").frames


def prepare_shard_data(data_dir: Path) -> list[str]:
    """synth -> train-vae -> encode (train and held-out shards) -> verify; returns the data overrides."""
    from data_prep.demo import DemoScale, prepare_shards

    return prepare_shards(data_dir, DemoScale())


def run_demo(cfg: Config, eval_clips: int, context: int, pinned: dict[str, str] | None = None) -> dict:
    run_dir = Path(cfg.train.run_dir)
    if (run_dir / "config.yaml").exists():  # an earlier demo: start over rather than resume it
        shutil.rmtree(run_dir)
    torch.manual_seed(cfg.train.seed)
    result = train(cfg)
    model, model_cfg = load_model(run_dir)
    score = next_frame_score(model, model_cfg, clips=eval_clips, context=context,
                             steps=cfg.diffusion.sample_steps)
    request = SampleRequest(clips=4, context=context, unroll=holdout_frames(cfg) - context)
    batch, rollout, codec = rollout_clips(model, model_cfg, request)
    samples = write_samples(batch.latents, rollout, codec, context, run_dir / "samples", batch.keys)
    curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    speed = measure_speed_ratio(cfg, context=min(16, cfg.model.max_frames - 8))
    summary = {
        "steps": result.step,
        "loss_initial": result.losses[0][1],
        "loss_final": result.losses[-1][1],
        "next_frame": vars(score),
        "speed": speed,
        "samples": [str(p) for p in samples],
        "loss_curve": str(curve),
        "run_dir": str(run_dir),
        "cpu_numerics": pinned or {},
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@command("scd-demo")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scd-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=sorted(DEFAULT_CONFIGS), default="shards",
                        help="shards: through scd-data and latent shards; synthetic: frames rendered in memory")
    parser.add_argument("--config", type=Path, help="default: configs/tiny_shards.yaml or configs/tiny.yaml")
    parser.add_argument("--data-dir", type=Path, default=Path("demo_out/data"), help="videos, VAE and shards")
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    pinned = pin_cpu_numerics()
    data_overrides = prepare_shard_data(args.data_dir) if args.source == "shards" else []
    cfg = load_config(args.config or DEFAULT_CONFIGS[args.source],
                      [*data_overrides, "train.run_dir=runs/demo", "train.resume=false", *args.overrides])
    summary = run_demo(cfg, args.eval_clips, args.context, pinned)
    print_table(summary)
    print(f"samples: {Path(cfg.train.run_dir) / 'samples'}   loss curve: {summary['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
