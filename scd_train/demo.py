"""``make demo``: train the tiny SCD on moving digits, then sample, score and time it.

    python -m scd_train.demo                      # the full demo (a few minutes on 2 CPU cores)
    python -m scd_train.demo train.steps=50       # any dotted override of the config
    python -m scd_train.demo --source synthetic   # skip the data pipeline: frames rendered in memory
    python -m scd_train.demo --world breakout     # a real game: record -> ... -> score against the emulator

By default the data goes the way users' data goes: synthetic videos written as mp4, a small VAE
trained on them, clips encoded to latent shards (``scd-data``), then training from the shards and
sampling decoded through the same VAE. Data stages reuse their output in --data-dir when run again.

``--world breakout`` (or ``crafter``) records the game instead (``scd-data record``), trains
configs/<world>.yaml from its shards, and scores the model against the emulator itself
(``scd-eval --emulator``: rollout PSNR/SSIM at horizons 1, 4, 16 and action accuracy, beside
copy-last-frame).

Writes into the run directory (runs/demo by default, runs/demo-<world> for a world): checkpoints,
metrics.jsonl, samples/ (mp4 + gif, ground truth | generated), loss_curve.png and demo_summary.json.
The demo always trains from scratch: it empties a run directory that an earlier demo made and
refuses one that holds anything else (a run of the user's given as ``train.run_dir``).
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
from scd_train.errors import InputError
from scd_train.eval.next_frame import next_frame_score
from scd_train.eval.speed import SpeedSettings, measure
from scd_train.sample import SampleRequest, rollout_clips, write_samples
from scd_train.weights import load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIGS = {"shards": CONFIGS / "tiny_shards.yaml", "synthetic": CONFIGS / "tiny.yaml"}
DEFAULT_DATA_DIR = Path("demo_out/data")
WORLD_CONFIGS = {"breakout": CONFIGS / "breakout.yaml", "crafter": CONFIGS / "crafter.yaml"}
# Left in every run directory the demo makes, so that a later demo knows it may empty that directory.
DEMO_MARK = "made_by_scd_demo"
SUMMARY = "demo_summary.json"  # what a finished demo (also one from before the mark existed) leaves


class DemoInputError(InputError):
    """Bad input to the demo: the message names the setting and the value."""


def start_over(run_dir: Path) -> None:
    """Give the demo an empty ``run_dir``: one an earlier demo made is emptied, any other that holds
    files is refused (never deleted), since a dotted override can point the demo anywhere."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not ((run_dir / DEMO_MARK).is_file() or (run_dir / SUMMARY).is_file()):
            held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:5])
            raise DemoInputError(f"train.run_dir={str(run_dir)!r} holds files the demo did not write ({held}); "
                                 "the demo trains from scratch and empties its run directory: choose a new or "
                                 "empty train.run_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DEMO_MARK).write_text("made by scd-demo, which empties this directory when it runs again\n")


def train(cfg: Config):
    from scd_train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.runtime.shutdown()


def plot_loss_curve(metrics_path: Path, out: Path, title: str = "tiny SCD on moving digits") -> Path:
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
    ax.set_title(title)
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
    start_over(run_dir)
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
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def run_world_demo(cfg: Config, world: str, eval_starts: int, context: int, clock) -> dict:
    """Train on the recorded game, sample held-out clips, then score the model against the emulator."""
    from scd_train.eval.emulator import EmulatorProtocol
    from scd_train.eval.emulator_run import run_emulator_eval
    from scd_train.eval.evaluate import Candidate

    run_dir = Path(cfg.train.run_dir)
    start_over(run_dir)
    torch.manual_seed(cfg.train.seed)
    with clock.stage("train"):
        result = train(cfg)
    with clock.stage("sample"):
        model, model_cfg = load_model(run_dir)
        request = SampleRequest(clips=4, context=context, unroll=holdout_frames(cfg) - context)
        batch, rollout, codec = rollout_clips(model, model_cfg, request)
        samples = write_samples(batch.latents, rollout, codec, context, run_dir / "samples", batch.keys)
        curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", f"SCD world model of {world}")
    with clock.stage("score"):
        protocol = EmulatorProtocol(starts=eval_starts, context=context, videos=2)
        scores = run_emulator_eval([Candidate("scd", model, model_cfg, str(run_dir))], protocol, run_dir / "eval",
                                   log=lambda message: None)
    summary = {
        "world": world,
        "steps": result.step,
        "loss_initial": result.losses[0][1],
        "loss_final": result.losses[-1][1],
        "emulator": {name: {"horizons": m["horizons"], "action_accuracy": m["action_accuracy"],
                            "action_pairs": m["action_pairs"]} for name, m in scores["models"].items()},
        "emulator_states": len(scores["states"]),
        "stage_seconds": clock.seconds,
        "samples": [str(p) for p in samples] + scores["videos"],
        "loss_curve": str(curve),
        "run_dir": str(run_dir),
    }
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def print_world_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"scd-train demo: SCD world model of {summary['world']}, scored against the emulator")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("training steps", str(summary["steps"]))
    table.add_row("loss: first logged -> final", f"{summary['loss_initial']:.4f} -> {summary['loss_final']:.4f}")
    scd, copy = summary["emulator"]["scd"], summary["emulator"]["copy_last"]
    for k in scd["horizons"]:
        table.add_row(f"PSNR @ frame {k}: SCD vs copy last frame ({summary['emulator_states']} states)",
                      f"{scd['horizons'][k]['psnr']:.2f} vs {copy['horizons'][k]['psnr']:.2f} dB")
    accuracy = scd["action_accuracy"]
    table.add_row(f"action accuracy ({scd['action_pairs']} branch pairs; 50% = ignores actions)",
                  "-" if accuracy is None else f"{100 * accuracy:.1f}%")
    stages = ", ".join(f"{k} {v['wall_s']:.0f}s ({v['cpu_s']:.0f}s CPU)" for k, v in summary["stage_seconds"].items())
    table.add_row("stage times (wall, CPU)", stages)
    table.add_row("run directory", summary["run_dir"])
    Console().print(table)


@command("scd-demo")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scd-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=sorted(DEFAULT_CONFIGS), default="shards",
                        help="shards: through scd-data and latent shards; synthetic: frames rendered in memory")
    parser.add_argument("--world", choices=sorted(WORLD_CONFIGS),
                        help="record this game instead of the digits and score the model against its emulator")
    parser.add_argument("--eval-starts", type=int, default=8, help="--world: held-out game states scored")
    parser.add_argument("--config", type=Path, help="default: configs/tiny_shards.yaml or configs/tiny.yaml")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="videos, VAE and shards (--world: demo_out/<world> by default)")
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    if args.world is not None:
        return world_main(args)
    pinned = pin_cpu_numerics()
    data_overrides = prepare_shard_data(args.data_dir) if args.source == "shards" else []
    cfg = load_config(args.config or DEFAULT_CONFIGS[args.source],
                      [*data_overrides, "train.run_dir=runs/demo", "train.resume=false", *args.overrides])
    summary = run_demo(cfg, args.eval_clips, args.context, pinned)
    print_table(summary)
    print(f"samples: {Path(cfg.train.run_dir) / 'samples'}   loss curve: {summary['loss_curve']}")
    return 0


def world_main(args: argparse.Namespace) -> int:
    from data_prep.demo import StageClock, WorldScale, prepare_world_shards

    clock = StageClock()
    data_dir = args.data_dir if args.data_dir != DEFAULT_DATA_DIR else Path("demo_out") / args.world
    config = args.config or WORLD_CONFIGS[args.world]
    model = load_config(config, args.overrides).model
    scale = WorldScale()
    scale.compression, scale.latent_channels = scale.size // model.latent_height, model.latent_channels
    overrides = prepare_world_shards(args.world, data_dir, scale, clock)
    # its own directory: a world demo never empties the digits demo's runs/demo
    cfg = load_config(config, [*overrides, f"train.run_dir=runs/demo-{args.world}", "train.resume=false",
                               *args.overrides])
    summary = run_world_demo(cfg, args.world, args.eval_starts, args.context, clock)
    print_world_table(summary)
    print(f"samples: {Path(cfg.train.run_dir) / 'samples'}   branch videos: {Path(cfg.train.run_dir) / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
