"""Few-step students against their teachers: quality on held-out clips and per-frame time.

    python bench/distill.py --run runs/scd --baseline-run runs/dense           # the digits (README)
    python bench/distill.py --run runs/breakout --baseline-run runs/breakout-dense   # game data, the same way

For each teacher run (SCD, and the dense baseline when given) and each student step count K
(--student-steps, default 1 2 4) the student run <run>-distill-k<K> is distilled with scd-distill
unless it already holds --distill-steps steps (a partial one resumes). Then, on the same held-out
clips and seeds: next-frame and --rollout-frame rollout PSNR / SSIM of the teacher at its steps,
the teacher sampled at K steps without distillation, and each student; and per-frame time of the
teacher and every student streamed side by side in one run (``metrics.timing.interleaved``: order
flipped each repeat, wall and process CPU time, machine load recorded). Writes one JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import torch

from scd_train import distill
from scd_train.checkpoint import CheckpointManager, step_of
from scd_train.config import Config
from scd_train.diffusion.sampling import new_stream, settings_from_config
from scd_train.env import library_versions
from scd_train.eval.clips import holdout_eval_clips
from scd_train.eval.evaluate import Candidate, evaluate
from scd_train.eval.protocol import EvalProtocol
from scd_train.eval.report import write_json
from scd_train.metrics.timing import MachineLoad, interleaved
from scd_train.weights import load_model

TARGET_PSNR_GAP_DB = 0.5  # the 4-step student within this of its teacher, next frame
TARGET_SPEEDUP = 5.0  # the 4-step student at least this much faster per frame than its teacher


def student_dir(run: Path, steps: int, self_rollout: bool = False) -> Path:
    out = distill.default_out(run, steps)
    return out.with_name(out.name + "-rollout") if self_rollout else out


def distilled_steps(run: Path) -> int:
    found = CheckpointManager(run / "checkpoints", 1, runtime=None).complete_checkpoints()
    return step_of(found[-1]) if found else 0


def ensure_student(teacher: Path, steps: int, args: argparse.Namespace, self_rollout: bool = False) -> Path:
    out = student_dir(teacher, steps, self_rollout)
    if (out / "config.yaml").is_file() and distilled_steps(out) >= args.distill_steps:
        print(f"reusing {out} ({distilled_steps(out)} steps)", flush=True)
        return out
    argv = [str(teacher), "--steps", str(steps), "--out", str(out), f"train.steps={args.distill_steps}",
            f"train.checkpoint_every={args.distill_steps}", "log.progress_bar=false", *args.override]
    if self_rollout:
        argv.append("distill.self_rollout=true")
    if args.config:
        argv += ["--config", str(args.config)]
    if args.teacher_steps:
        argv += ["--teacher-steps", str(args.teacher_steps)]
    if load_model_cfg(teacher).model.arch == "causal_dit":
        argv.append("--baseline")
    print(f"distilling {out}", flush=True)
    if distill.main(argv) != 0:
        raise SystemExit(f"scd-distill {' '.join(argv)} failed")
    return out


def load_model_cfg(run: Path) -> Config:
    from scd_train.config import load_config

    return load_config(run / "config.yaml")


def with_steps(cfg: Config, steps: int, schedule: str) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.diffusion.sample_steps, cfg.diffusion.sample_schedule = steps, schedule
    return cfg


def candidates_for(teacher: Path, steps: list[int], args: argparse.Namespace, prefix: str) -> list[Candidate]:
    """The teacher at the steps it is distilled from (first), at --extra-teacher-steps, at each K
    undistilled (uniform grid); each student; the self-rollout student when asked."""
    model, cfg = load_model(teacher, device=args.device)
    n = args.teacher_steps or cfg.diffusion.sample_steps
    schedule = cfg.diffusion.sample_schedule
    full = dict.fromkeys([n, *(m for m in args.extra_teacher_steps if m not in steps)])
    out = [Candidate(f"{prefix}teacher@{m}", model, with_steps(cfg, m, schedule), str(teacher)) for m in full]
    for k in steps:
        out.append(Candidate(f"{prefix}teacher@{k}", model, with_steps(cfg, k, "uniform"), str(teacher)))
        student = ensure_student(teacher, k, args)
        s_model, s_cfg = load_model(student, device=args.device)
        out.append(Candidate(f"{prefix}student@{k}", s_model, s_cfg, str(student)))
    if args.self_rollout and not prefix:
        k = max(steps)
        student = ensure_student(teacher, k, args, self_rollout=True)
        s_model, s_cfg = load_model(student, device=args.device)
        out.append(Candidate(f"{prefix}student@{k}+rollout", s_model, s_cfg, str(student)))
    return out


def step_seconds(run: Path) -> float:
    """Median wall seconds per distillation step over the run's logged windows."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = sorted(r["perf/step_seconds"] for r in records if "perf/step_seconds" in r)
    return values[len(values) // 2]


def quality(cands: list[Candidate], args: argparse.Namespace) -> dict[str, dict]:
    """Next-frame and rollout PSNR / SSIM of every candidate, same clips and seeds."""
    results: dict[str, dict] = {c.name: {} for c in cands}
    for label, unroll in (("next_frame", 1), (f"rollout_{args.rollout}", args.rollout)):
        protocol = EvalProtocol(context=args.context, unroll=unroll, trajectories=1, clips=args.clips,
                                batch_clips=args.batch_clips, seed=args.seed)
        clips, decode = holdout_eval_clips(cands[0].cfg, protocol.frames, protocol.clips)
        run = evaluate(cands, clips, decode, protocol, sheet_clips=0, device=args.device)
        for name, tally in run.tallies.items():
            summary = tally.summary(official=False)["metrics"]
            results[name][label] = {"psnr": summary["psnr"], "ssim": summary["ssim"], "clips": len(run.keys)}
    return results


def frame_timing(cands: list[Candidate], args: argparse.Namespace) -> dict[str, dict]:
    """Per-frame streaming time of every candidate, interleaved, batch 1, after --timing-context frames."""
    ref = cands[0].cfg
    clips, _ = holdout_eval_clips(ref, args.timing_context, 1)
    context = clips[0].latents[None].to(args.device)
    actions = None if clips[0].actions is None else clips[0].actions[None].to(args.device)
    calls = args.timing_context + args.repeats + args.warmup
    callables = {}
    for cand in cands:
        settings = settings_from_config(cand.cfg.diffusion,
                                        cfg_mode=None if cand.cfg.model.arch == "scd" else "action")
        stream = new_stream(cand.model, settings, 1, calls, torch.Generator(args.device).manual_seed(0))
        stream.prefill(context, actions)
        action = None if actions is None else actions[:, -1]
        callables[cand.name] = lambda s=stream, a=action: s.next_frame(a)
    stats = interleaved(callables, args.repeats, args.warmup, args.device)
    return {name: {**s.summary(), "steps": c.cfg.diffusion.sample_steps}
            for (name, s), c in zip(stats.items(), cands)}


def ratios(timing: dict[str, dict], teachers: list[str], prefix: str, steps: list[int]) -> dict:
    """Per-frame speed-up of each student over each timed teacher, wall and process CPU time."""
    out = {}
    for k in steps:
        s = timing[f"{prefix}student@{k}"]
        out[f"{prefix}student@{k}"] = {
            t: {"wall_speedup": timing[t]["wall_s_median"] / s["wall_s_median"],
                "cpu_speedup": timing[t]["cpu_s_median"] / s["cpu_s_median"]} for t in teachers}
    return out


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    steps = sorted(set(args.student_steps))
    scd = candidates_for(args.run, steps, args, "")
    dense = candidates_for(args.baseline_run, steps, args, "dense/") if args.baseline_run else []
    everything = scd + dense
    load_before = MachineLoad.now()
    scores = {**quality(scd, args), **(quality(dense, args) if dense else {})}
    undistilled = {f"{p}teacher@{k}" for p in ("", "dense/") for k in steps}
    timed = [c for c in everything if c.name not in undistilled]  # the same cost as the students
    timing = frame_timing(timed, args)
    scd_teachers = [c.name for c in timed if c.name.startswith("teacher@")]
    dense_teachers = [c.name for c in timed if c.name.startswith("dense/teacher@")]
    report = {
        "benchmark": "distill", "date": datetime.date.today().isoformat(),
        "device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "machine_load": {"before": load_before.to_dict(), "after": MachineLoad.now().to_dict()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": {c.name: c.source for c in everything},
        "quality": scores, "frame_timing": timing,
        "speedup_over_teacher": ratios(timing, scd_teachers, "", steps),
        "versions": library_versions(),
    }
    if args.self_rollout:
        k = max(steps)
        forced, rollout = student_dir(args.run, k), student_dir(args.run, k, self_rollout=True)
        report["self_rollout"] = {"student": f"student@{k}+rollout", "step_seconds": step_seconds(rollout),
                                  "teacher_forced_step_seconds": step_seconds(forced),
                                  "step_cost_ratio": step_seconds(rollout) / step_seconds(forced)}
    if dense:
        report["speedup_over_teacher"].update(ratios(timing, dense_teachers, "dense/", steps))
        report["scd_vs_dense"] = {
            f"student@{k}": {"vs_dense_teacher": timing[dense[0].name]["wall_s_median"]
                             / timing[f"student@{k}"]["wall_s_median"],
                             "vs_dense_student_same_steps": timing[f"dense/student@{k}"]["wall_s_median"]
                             / timing[f"student@{k}"]["wall_s_median"]} for k in steps}
    if 4 in steps:
        gap = scores[scd[0].name]["next_frame"]["psnr"] - scores["student@4"]["next_frame"]["psnr"]
        speed = report["speedup_over_teacher"]["student@4"][scd[0].name]["wall_speedup"]
        report["targets"] = {"teacher": scd[0].name, "psnr_gap_db": gap, "psnr_gap_target_db": TARGET_PSNR_GAP_DB,
                             "psnr_met": gap <= TARGET_PSNR_GAP_DB, "speedup": speed,
                             "speedup_target": TARGET_SPEEDUP, "speedup_met": speed >= TARGET_SPEEDUP}
    return report


def print_report(report: dict) -> None:
    rollout = next(k for k in next(iter(report["quality"].values())) if k.startswith("rollout"))
    print(f"{'model':22s} {'next PSNR':>9s} {'SSIM':>6s} {rollout + ' PSNR':>16s} {'SSIM':>6s} {'ms/frame':>9s}")
    for name, q in report["quality"].items():
        t = report["frame_timing"].get(name)
        ms = f"{t['wall_s_median'] * 1e3:9.1f}" if t else f"{'':9s}"
        print(f"{name:22s} {q['next_frame']['psnr']:9.2f} {q['next_frame']['ssim']:6.3f} "
              f"{q[rollout]['psnr']:16.2f} {q[rollout]['ssim']:6.3f} {ms}")
    for name, per_teacher in report["speedup_over_teacher"].items():
        for teacher, r in per_teacher.items():
            print(f"{name}: {r['wall_speedup']:.2f}x faster per frame than {teacher} "
                  f"(CPU time {r['cpu_speedup']:.2f}x)")
    for name, r in report.get("scd_vs_dense", {}).items():
        print(f"SCD {name}: {r['vs_dense_teacher']:.2f}x faster than the dense teacher, "
              f"{r['vs_dense_student_same_steps']:.2f}x faster than the dense student at the same steps")
    if "self_rollout" in report:
        r = report["self_rollout"]
        print(f"self-rollout distillation step: {r['step_seconds']:.2f}s vs {r['teacher_forced_step_seconds']:.2f}s "
              f"teacher-forced ({r['step_cost_ratio']:.2f}x)")
    if "targets" in report:
        t = report["targets"]
        print(f"4-step student vs {t['teacher']}: next-frame PSNR gap {t['psnr_gap_db']:+.2f} dB (target <= "
              f"{t['psnr_gap_target_db']}), {t['speedup']:.2f}x faster per frame (target >= {t['speedup_target']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the SCD teacher run")
    p.add_argument("--baseline-run", type=Path, help="the dense baseline run, distilled the same way")
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--distill-steps", type=int, default=300, help="optimizer steps of each distillation")
    p.add_argument("--config", type=Path, help="scd-distill recipe YAML (e.g. configs/distill_tiny.yaml)")
    p.add_argument("--teacher-steps", type=int, help="teacher steps distilled from (default: its sample_steps)")
    p.add_argument("--extra-teacher-steps", type=int, nargs="*", default=[],
                   help="also score and time the teachers at these steps (e.g. 50, the paper's)")
    p.add_argument("--self-rollout", action="store_true",
                   help="also distil the largest-K student on its own rollouts and report quality and step cost")
    p.add_argument("--clips", type=int, default=32, help="held-out clips scored")
    p.add_argument("--batch-clips", type=int, default=8)
    p.add_argument("--context", type=int, default=4, help="ground-truth frames before the scored ones")
    p.add_argument("--rollout", type=int, default=16, help="frames of the long rollout")
    p.add_argument("--timing-context", type=int, default=16, help="context frames before the timed frames")
    p.add_argument("--repeats", type=int, default=20, help="timed frames per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="default bench/results/distill-<run name>-<device>.json")
    p.add_argument("override", nargs="*", help="dotted overrides for the distillations (e.g. optim.lr=5e-4)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    kind = "cpu" if args.device == "cpu" else "cuda"
    out = args.out or Path("bench/results") / f"distill-{args.run.name}-{kind}.json"
    write_json(report, out)  # atomic: a killed run never leaves half a file
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
