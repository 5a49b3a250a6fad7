"""Real worlds: record a game, train SCD and the dense baseline on the same shards for the same
steps, and score both against the emulator (rollout PSNR/SSIM per horizon, action accuracy).

    python bench/worlds.py --world breakout          # JSON -> bench/results/worlds_breakout.json
    python bench/worlds.py --world crafter
    python bench/worlds.py --world breakout --quick  # a few-minute check of the harness, not a result

Both models come from configs/<world>.yaml and differ only in model.arch (the dense baseline is as
deep as SCD's encoder + decoder, same width): same data, data order, seed and steps. Training is
interleaved in chunks (SCD, dense, dense, SCD, ...; each chunk resumes the run's checkpoint), so
machine-load drift lands on both; every chunk's wall and process CPU seconds are recorded with the
machine load, beside the analytic training FLOPs. Data loading runs in the training process
(data.num_workers=0) so its CPU time is counted. Every stage reuses its finished output in
--work-dir, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.demo import WORLD_CLIP_FRAMES, WORLDS  # noqa: E402
from data_prep.encode import EncodeOptions, encode  # noqa: E402
from data_prep.record import RecordOptions, record  # noqa: E402
from data_prep.train_vae import VaeTrainOptions, train_vae  # noqa: E402
from scd_train.config import load_config  # noqa: E402
from scd_train.eval.emulator import EmulatorProtocol  # noqa: E402
from scd_train.eval.emulator_run import emulator_table, run_emulator_eval  # noqa: E402
from scd_train.eval.evaluate import Candidate  # noqa: E402
from scd_train.eval.report import write_json  # noqa: E402
from scd_train.metrics.flops import train_step_flops  # noqa: E402
from scd_train.metrics.timing import MachineLoad, time_call  # noqa: E402
from scd_train.weights import load_model  # noqa: E402

ARCHS = {"scd": [], "dense": ["model.arch=causal_dit"]}


@dataclass
class Scale:
    episodes: int = 32
    holdout_episodes: int = 4
    frames: int = 200
    vae_steps: int = 1500
    foreground_weight: float = 20.0
    steps: int = 300
    chunks: int = 3
    starts: int = 16


QUICK = Scale(episodes=6, holdout_episodes=2, frames=80, vae_steps=40, foreground_weight=20.0, steps=20, chunks=2,
              starts=3)


def vae_geometry(world: str, size: int = 64) -> tuple[int, int]:
    """(spatial compression, latent channels) that give the latents configs/<world>.yaml expects."""
    model = load_config(REPO / "configs" / f"{world}.yaml").model
    return size // model.latent_height, model.latent_channels


def prepare_data(world: str, work: Path, scale: Scale, workers: int) -> dict:
    stages = {}
    start = time.perf_counter()
    rec = record(RecordOptions(WORLDS[world], work / "recording", episodes=scale.episodes,
                               holdout_episodes=scale.holdout_episodes, frames=scale.frames, workers=workers))
    stages["record_s"] = time.perf_counter() - start
    vae = work / "vae"
    start = time.perf_counter()
    if not (vae / "config.json").is_file():
        compression, channels = vae_geometry(world)
        train_vae(VaeTrainOptions(work / "recording" / "train", vae, steps=scale.vae_steps, batch_size=16,
                                  compression=compression, latent_channels=channels,
                                  foreground_weight=scale.foreground_weight))
    stages["train_vae_s"] = time.perf_counter() - start
    vae_report = json.loads((vae / "training.json").read_text())
    start = time.perf_counter()
    clips = {}
    for split, stride in (("train", 4), ("holdout", WORLD_CLIP_FRAMES)):
        summary = encode(EncodeOptions(work / "recording" / split, work / "shards" / split, vae,
                                       clip_frames=WORLD_CLIP_FRAMES, stride=stride, workers=workers))
        clips[split] = summary.clips
    stages["encode_s"] = time.perf_counter() - start
    return {"env": WORLDS[world], "episodes": {s: len(v) for s, v in rec.episodes.items()}, "frames": rec.frames,
            "short_episodes": rec.short, "clips": clips, "clip_frames": WORLD_CLIP_FRAMES,
            "vae": {"steps": vae_report["steps"], "reconstruction_psnr_db": vae_report["psnr_db"],
                    "foreground_psnr_db": vae_report.get("foreground_psnr_db"),
                    "foreground_weight": vae_report["options"].get("foreground_weight", 0.0),
                    "compression": vae_report["options"]["compression"],
                    "latent_channels": vae_report["options"]["latent_channels"]},
            "stage_seconds": stages}


def _forget_run_logging(run_dir: Path) -> None:
    """Drop the file handler a finished in-process run added, so the next run logs only to its own file."""
    logger = logging.getLogger("scd_train")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            logger.removeHandler(handler)
            handler.close()


def train_chunk(config: Path, overrides: list[str], run_dir: Path, steps: int) -> tuple[float, float, list]:
    from scd_train.trainer import Trainer

    cfg = load_config(config, [*overrides, f"train.run_dir={run_dir}", f"train.steps={steps}", "train.resume=true"])
    holder = {}

    def run() -> None:
        trainer = Trainer(cfg)
        try:
            holder["result"] = trainer.run()
        finally:
            trainer.runtime.shutdown()
            _forget_run_logging(run_dir)

    wall, cpu = time_call(run)
    return wall, cpu, holder["result"].losses


def train_both(world: str, work: Path, scale: Scale, log_path: Path) -> dict:
    """SCD and dense, chunk by chunk in alternating order; chunk timings persist across interruptions."""
    config = REPO / "configs" / f"{world}.yaml"
    data = [f"data.path={work / 'shards' / 'train'}", f"data.holdout_path={work / 'shards' / 'holdout'}",
            "data.num_workers=0", "log.progress_bar=false", "log.wandb=disabled",
            f"train.checkpoint_every={scale.steps}"]
    timings = json.loads(log_path.read_text()) if log_path.is_file() else {"chunks": []}
    done = {(c["model"], c["until_step"]) for c in timings["chunks"]}
    for chunk in range(scale.chunks):
        until = scale.steps * (chunk + 1) // scale.chunks
        order = list(ARCHS) if chunk % 2 == 0 else list(ARCHS)[::-1]
        for name in order:
            if (name, until) in done:
                continue
            load = MachineLoad.now().to_dict()
            wall, cpu, losses = train_chunk(config, [*data, *ARCHS[name]], work / "runs" / name, until)
            timings["chunks"].append({"model": name, "until_step": until, "wall_s": wall, "cpu_s": cpu,
                                      "machine_load": load, "losses": losses})
            log_path.write_text(json.dumps(timings, indent=1))
            print(f"{name}: step {until}/{scale.steps} in {wall:.0f}s wall, {cpu:.0f}s CPU", flush=True)
    out = {}
    for name, extra in ARCHS.items():
        cfg = load_config(config, [*data, *extra])
        chunks = [c for c in timings["chunks"] if c["model"] == name]
        losses = [pair for c in chunks for pair in c["losses"]]
        model = load_model(work / "runs" / name)[0]
        per_step = train_step_flops(cfg)
        out[name] = {"arch": cfg.model.arch, "parameters": sum(p.numel() for p in model.parameters()),
                     "steps": scale.steps, "wall_s": sum(c["wall_s"] for c in chunks),
                     "cpu_s": sum(c["cpu_s"] for c in chunks), "chunks": len(chunks),
                     "train_flops_per_step": per_step.total, "train_flops": per_step.total * scale.steps,
                     "train_flops_encoder_decoder": [per_step.encoder * scale.steps, per_step.decoder * scale.steps],
                     "loss_first_logged": losses[0][1] if losses else None,
                     "loss_final": losses[-1][1] if losses else None, "run_dir": str(work / "runs" / name)}
    out["chunk_timings"] = timings["chunks"]
    return out


def evaluate(work: Path, scale: Scale) -> dict:
    candidates = []
    for label, name in (("scd", "scd"), ("baseline", "dense")):
        model, cfg = load_model(work / "runs" / name)
        candidates.append(Candidate(label, model, cfg, str(work / "runs" / name)))
    protocol = EmulatorProtocol(starts=scale.starts)
    return run_emulator_eval(candidates, protocol, work / "eval", log=lambda m: print(m, file=sys.stderr))


def markdown_table(result: dict) -> str:
    models, names = result["emulator"]["models"], ["scd", "baseline", "copy_last", "vae_ceiling"]
    header = "| | SCD | dense baseline | copy last frame | VAE ceiling |\n|---|---:|---:|---:|---:|"
    rows = []
    for k in result["emulator"]["protocol"]["horizons"]:
        rows.append(f"| PSNR @{k} (dB) | " + " | ".join(f"{models[n]['horizons'][str(k)]['psnr']:.2f}"
                                                        for n in names) + " |")
    for k in result["emulator"]["protocol"]["horizons"]:
        rows.append(f"| SSIM @{k} | " + " | ".join(f"{models[n]['horizons'][str(k)]['ssim']:.3f}"
                                                   for n in names) + " |")
    accuracy = [models[n]["action_accuracy"] for n in names]
    rows.append("| action accuracy | " + " | ".join("-" if a is None else f"{100 * a:.1f}%" for a in accuracy) + " |")
    train = result["training"]
    rows.append(f"| training steps | {train['scd']['steps']} | {train['dense']['steps']} | | |")
    rows.append(f"| training TFLOPs | {train['scd']['train_flops'] / 1e12:.1f} | "
                f"{train['dense']['train_flops'] / 1e12:.1f} | | |")
    rows.append(f"| training wall / CPU s | {train['scd']['wall_s']:.0f} / {train['scd']['cpu_s']:.0f} | "
                f"{train['dense']['wall_s']:.0f} / {train['dense']['cpu_s']:.0f} | | |")
    return "\n".join([header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=sorted(WORLDS), required=True)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, not a result")
    parser.add_argument("--steps", type=int, help="training steps of each model (default 300)")
    parser.add_argument("--vae-steps", type=int, help="VAE training steps (default 1500)")
    parser.add_argument("--work-dir", type=Path, help="default: runs/bench_worlds/<world>[_quick]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else Scale()
    if args.steps:
        scale.steps = args.steps
    if args.vae_steps:
        scale.vae_steps = args.vae_steps
    suffix = "_quick" if args.quick else ""
    work = args.work_dir or REPO / "runs" / "bench_worlds" / f"{args.world}{suffix}"
    out = args.out or REPO / "bench" / "results" / f"worlds_{args.world}{suffix}.json"
    work.mkdir(parents=True, exist_ok=True)
    load_start = MachineLoad.now().to_dict()
    started = time.perf_counter()
    data = prepare_data(args.world, work, scale, args.workers)
    training = train_both(args.world, work, scale, work / "training_timings.json")
    emulator = evaluate(work, scale)
    result = {"benchmark": "worlds", "world": args.world, "quick": args.quick, "scale": asdict(scale),
              "command": " ".join(["python", "bench/worlds.py", *(argv if argv is not None else sys.argv[1:])]),
              "data": data, "training": training, "emulator": emulator,
              "machine_load": {"start": load_start, "end": MachineLoad.now().to_dict()},
              "seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    from rich.console import Console

    Console().print(emulator_table(emulator))
    print(markdown_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
