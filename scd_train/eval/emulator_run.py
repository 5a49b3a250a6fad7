"""``scd-eval --emulator``: SCD, the dense baseline, copy-last-frame and the VAE ceiling, scored
against the real game from held-out states; ``emulator_eval.json``, a table and branch videos.

    scd-eval --scd runs/breakout_scd --baseline runs/breakout_dense --emulator --starts 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scd_train.data.manifest import Manifest, load_manifest
from scd_train.data.vae_codec import VaeCodec
from scd_train.errors import InputError
from scd_train.eval.against_emulator import (
    REFERENCES,
    Predictions,
    Truth,
    model_predictions,
    reference_predictions,
    score,
)
from scd_train.eval.emulator import EmulatorProtocol, WorldSpec, collect_states
from scd_train.eval.evaluate import Candidate
from scd_train.eval.report import write_json
from scd_train.eval.sheets import grid_video
from scd_train.metrics.timing import MachineLoad
from scd_train.video import write_gif, write_mp4

LABELS = {"scd": "SCD", "baseline": "dense baseline", "copy_last": "copy last frame", "vae_ceiling": "VAE ceiling"}
RESULT_FILE = "emulator_eval.json"


def training_world(candidates: list[Candidate]) -> tuple[WorldSpec, Manifest]:
    """The world every candidate was trained on; all must share it (and its VAE)."""
    found = []
    for cand in candidates:
        if cand.cfg.data.path is None:
            raise InputError(f"{cand.source}: data.path is not set; the emulator evaluation reads the training "
                             "manifest's source block to know which game to replay")
        manifest = load_manifest(cand.cfg.data.path, f"data.path of {cand.source}")
        found.append((cand, WorldSpec.from_source(manifest.source, f"{manifest.root}/manifest.json"), manifest))
    first, world, manifest = found[0]
    for cand, other, other_manifest in found[1:]:
        if other != world:
            raise InputError(f"{first.source} was trained on {world.to_dict()} but {cand.source} on "
                             f"{other.to_dict()}; compare models of one world")
        if other_manifest.vae.get("config_sha256") != manifest.vae.get("config_sha256"):
            raise InputError(f"{first.source} and {cand.source} were trained on latents of different VAEs "
                             f"({manifest.vae.get('id')} vs {other_manifest.vae.get('id')})")
    return world, manifest


def check_fit(candidates: list[Candidate], world: WorldSpec, codec: VaeCodec, protocol: EmulatorProtocol) -> None:
    latent = codec.latent_shape(world.size, world.size)
    for cand in candidates:
        m = cand.cfg.model
        if (m.latent_channels, m.latent_height, m.latent_width) != latent:
            raise InputError(f"{cand.source}: {world.size}x{world.size} frames of {world.env} encode to latents "
                             f"{latent} but the model expects (model.latent_channels, model.latent_height, "
                             f"model.latent_width)={(m.latent_channels, m.latent_height, m.latent_width)}")
        longest = protocol.context + max(protocol.rollout_frames, protocol.branch_frames)
        if longest > m.max_frames:
            raise InputError(f"{cand.source}: context {protocol.context} + {longest - protocol.context} generated "
                             f"frames exceed its model.max_frames={m.max_frames}")


def branch_videos(truth: Truth, predictions: dict[str, Predictions], protocol: EmulatorProtocol,
                  out_dir: Path) -> list[str]:
    """One video per state: a row per branch, columns context | real | each model (generated frames framed)."""
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in range(min(protocol.videos, truth.context.shape[0])):
        context = truth.context[n]
        real = [torch.cat([context, truth.branches[n, b]]) for b in range(protocol.branches)]
        models = {LABELS.get(name, name): [torch.cat([context, p.branches[n, b]]) for b in range(protocol.branches)]
                  for name, p in predictions.items()}
        scale = max(1, 128 // context.shape[-1])
        grid = grid_video(real, models, protocol.context, scale=scale, truth_label="real game")
        stem = out_dir / f"state_{n:03d}"
        written += [str(write_mp4(grid, stem.with_suffix(".mp4"), fps=4)),
                    str(write_gif(grid, stem.with_suffix(".gif"), fps=4))]
    return written


def run_emulator_eval(candidates: list[Candidate], protocol: EmulatorProtocol, out: Path,
                      device: torch.device | str = "cpu", log=print) -> dict:
    protocol.validate()
    device = torch.device(device)
    world, manifest = training_world(candidates)
    vae_path = candidates[0].cfg.data.vae_path or manifest.vae["path"]
    codec = VaeCodec(vae_path, manifest.normalization, device, expected=manifest.vae,
                     expected_label=str(manifest.root / "manifest.json"))
    check_fit(candidates, world, codec, protocol)
    load = MachineLoad.now()
    start = time.perf_counter()
    states, skipped = collect_states(world, protocol, progress=lambda n: log(f"emulator: {n}/{protocol.starts} states"))
    emulator_seconds = time.perf_counter() - start
    truth = Truth.from_states(states)
    predictions = {c.name: model_predictions(c, states, codec.encode, codec.decode, protocol, device)
                   for c in candidates}
    references = reference_predictions(truth, codec.encode, codec.decode)
    results = {name: score(p, truth, protocol) for name, p in {**predictions, **references}.items()}
    for cand in candidates:
        results[cand.name]["source"] = cand.source
        results[cand.name]["arch"] = cand.cfg.model.arch
    videos = branch_videos(truth, predictions, protocol, out / "branches") if protocol.videos else []
    data = {"mode": "emulator", "world": world.to_dict(), "protocol": _protocol_dict(protocol),
            "states": [{"episode_seed": s.episode_seed, "warmup_steps": s.warmup_steps} for s in states],
            "episodes_passed_over": skipped, "emulator_seconds": emulator_seconds,
            "vae": manifest.vae.get("id"), "models": results, "references": list(REFERENCES), "videos": videos,
            "machine_load": load.to_dict()}
    write_json(data, out / RESULT_FILE)
    return data


def _protocol_dict(protocol: EmulatorProtocol) -> dict:
    import dataclasses

    return dataclasses.asdict(protocol)


def emulator_table(data: dict):
    from rich.table import Table

    models = data["models"]
    names = list(models)
    world = data["world"]
    table = Table(title=f"{world['env']} vs the emulator: {len(data['states'])} held-out states, "
                        f"context {data['protocol']['context']}")
    table.add_column("metric")
    for name in names:
        table.add_column(LABELS.get(name, name), justify="right")
    for k in data["protocol"]["horizons"]:
        table.add_row(f"PSNR @{k} (dB) ↑", *[f"{models[n]['horizons'][str(k)]['psnr']:.2f}" for n in names])
    for k in data["protocol"]["horizons"]:
        table.add_row(f"SSIM @{k} ↑", *[f"{models[n]['horizons'][str(k)]['ssim']:.3f}" for n in names])
    table.add_row("action accuracy ↑", *[_percent(models[n]["action_accuracy"]) for n in names])
    table.add_row("branch pairs scored", *[str(models[n]["action_pairs"]) for n in names])
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


def print_emulator_table(data: dict) -> None:
    from rich.console import Console

    Console().print(emulator_table(data))


EVAL_ONLY_FLAGS = ("unroll", "trajectories", "clips", "batch_clips", "cfg_scale", "compat", "mp4_crf")


def protocol_from_args(args: argparse.Namespace) -> EmulatorProtocol:
    given = [f"--{n.replace('_', '-')}" for n in EVAL_ONLY_FLAGS if getattr(args, n) is not None]
    if given:
        raise InputError(f"{', '.join(given)} do not apply with --emulator (use --starts, --horizons, --branches, "
                         "--branch-frames)")
    # parsed by scd-eval's one --horizons flag (a list of ints); None: the emulator's default horizons
    horizons = sorted(set(args.horizons)) if args.horizons else list(EmulatorProtocol().horizons)
    protocol = EmulatorProtocol(starts=args.starts, context=args.context or EmulatorProtocol().context,
                                horizons=horizons, branches=args.branches, branch_frames=args.branch_frames,
                                warmup=args.warmup, steps=args.steps, seed=args.seed or 0, videos=args.videos)
    protocol.validate()
    return protocol


def flat_scalars(data: dict) -> dict[str, float]:
    out = {}
    for name, scores in data["models"].items():
        for k, values in scores["horizons"].items():
            out[f"emulator/{name}/psnr@{k}"] = values["psnr"]
            out[f"emulator/{name}/ssim@{k}"] = values["ssim"]
        if scores["action_accuracy"] is not None:
            out[f"emulator/{name}/action_accuracy"] = scores["action_accuracy"]
    return out


def run_from_args(args: argparse.Namespace, default_out: Path | None) -> int:
    """The ``--emulator`` mode of scd-eval."""
    from scd_train.eval.report import log_to_wandb
    from scd_train.weights import load_model

    if args.scd is None and args.baseline is None:
        raise InputError("give --scd and/or --baseline (a run directory or an exported .safetensors)")
    protocol = protocol_from_args(args)
    candidates = []
    for name, source in (("scd", args.scd), ("baseline", args.baseline)):
        if source is not None:
            model, cfg = load_model(source, use_ema=not args.raw, device=args.device)
            candidates.append(Candidate(name, model, cfg, str(source)))
    out = args.out or default_out
    data = run_emulator_eval(candidates, protocol, out, args.device, log=lambda m: print(m, file=sys.stderr))
    print_emulator_table(data)
    media = [("video", f"emulator/branches_{i}", Path(v)) for i, v in enumerate(data["videos"]) if v.endswith(".mp4")]
    log_to_wandb(args.wandb, out, args.wandb_project, f"emulator-{out.parent.name}",
                 {"protocol": data["protocol"], "world": data["world"]}, flat_scalars(data), media)
    print(f"wrote {out / RESULT_FILE}")
    return 0
