"""Dispatcher op count of one denoising step, for SCD's decoder and the dense baseline.

    python bench/decoder_ops.py                        # tiny dims, CPU, fp32
    python bench/decoder_ops.py --out /tmp/ops.json

Small models are bound by per-op overhead, not FLOPs: every aten op costs microseconds of
dispatch on a CPU and a kernel launch on a GPU. This counts the ops one Euler step issues, with
torch.profiler, as the difference between a frame rendered with ``--steps`` and one rendered with
``--steps // 2`` steps divided by the step difference, so the once-per-frame work (the encoder, the
dense model's cache append, the schedule) cancels out. ``all`` counts every aten event (an
``aten::linear`` that calls ``aten::addmm`` counts twice); ``top_level`` counts only ops called
from Python. JSON goes to bench/results/decoder_ops.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from scd_train.config import load_config
from scd_train.diffusion.sampling import SamplerSettings, new_stream
from scd_train.env import library_versions
from scd_train.eval.report import write_json
from scd_train.models import build_model


def _counts(prof) -> tuple[int, int]:
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events), len(top)


def ops_per_frame(model, steps: int, guided: bool, frames_before: int = 3) -> tuple[int, int]:
    """(all, top-level) aten ops of one generated frame after ``frames_before`` warm-up frames."""
    m = model.cfg
    cfg_mode = "decoder" if m.arch == "scd" else "action"
    settings = SamplerSettings(steps=steps, cfg_scale=2.0 if guided else 1.0, cfg_mode=cfg_mode)
    generator = torch.Generator().manual_seed(0)
    stream = new_stream(model, settings, 1, 16, generator)
    context = torch.randn(1, 2, m.latent_channels, m.latent_height, m.latent_width, generator=generator)
    action = torch.tensor([1])
    stream.prefill(context, torch.tensor([[0, 1]]))
    for _ in range(frames_before):
        stream.next_frame(action)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stream.next_frame(action)
    return _counts(prof)


def per_step_ops(model, steps: int, guided: bool) -> dict:
    full_all, full_top = ops_per_frame(model, steps, guided)
    half_all, half_top = ops_per_frame(model, steps // 2, guided)
    delta = steps - steps // 2
    return {"all": (full_all - half_all) / delta, "top_level": (full_top - half_top) / delta,
            "frame_all": full_all, "frame_top_level": full_top}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decoder_ops.json"))
    parser.add_argument("--label", default="current", help="name of this measurement in the JSON")
    parser.add_argument("override", nargs="*")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for arch in ("scd", "causal_dit"):
        cfg = load_config(args.config, [f"model.arch={arch}", *args.override])
        model = build_model(cfg.model).eval()
        with torch.no_grad():
            for guided in (False, True):
                results[f"{arch}{'_guided' if guided else ''}"] = per_step_ops(model, args.steps, guided)
    for name, row in results.items():
        print(f"{name:18s} aten ops per denoising step: {row['all']:7.1f} (top level {row['top_level']:6.1f})")
    report = {"benchmark": "decoder_ops", "date": datetime.date.today().isoformat(), "config": args.config,
              "overrides": args.override, "steps": args.steps, "versions": library_versions(),
              "label": args.label, "per_step": results}
    if args.out.exists():  # keep earlier labelled measurements (e.g. "before") beside this one
        previous = json.loads(args.out.read_text())
        report["earlier"] = {k: v for k, v in previous.get("earlier", {}).items() if k != args.label}
        if previous.get("label") != args.label:
            report["earlier"][previous["label"]] = {"date": previous["date"], "per_step": previous["per_step"]}
    write_json(report, args.out)  # atomic: a killed run never leaves half a file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
