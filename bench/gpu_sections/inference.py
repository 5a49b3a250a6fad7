"""Section 4: per-frame latency of SCD-M against the dense 12-layer baseline, through the streams.

Each stream is prefilled with the same context (144 frames on a GPU), then generates frames one
``next_frame`` call at a time; every candidate's frames are timed interleaved (``metrics.timing``),
under bf16 autocast on CUDA. Candidates: SCD-M and the dense baseline, 50 Euler steps, with and
without guidance, eagerly; then SCD-M with the compiled (CUDA-graphed) decoder loop beside eager
SCD-M again. The few-step student is SCD-M sampled in K steps: with ``--student-run`` a trained
student's run directory, else the same architecture with random weights, which measures its
speed, not its quality. Speed does not depend on what the weights learned.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from gpu_sections.common import (
    NEEDS_CUDA,
    SectionContext,
    SkipForTime,
    failure,
    model_config,
    randomize,
    timing_summary,
)
from gpu_sections.steps import fit_repeats

GUIDANCE_SCALE = 1.5  # any scale != 1 doubles the decoder batch; its value does not change the speed
GUIDANCE = {"unguided": 1.0, "guided": GUIDANCE_SCALE}


@dataclasses.dataclass
class Candidate:
    name: str
    model: torch.nn.Module
    cfg: object
    steps: int
    guided: str
    loop: str  # "eager" or "compiled"
    stream: object = None
    compile_seconds: float | None = None


def run(ctx: SectionContext) -> None:
    context = 8 if ctx.smoke else 144
    steps = 4 if ctx.smoke else 50
    models = _models(ctx)
    student_model, student_cfg, student_source = _student(ctx, models["scd"])
    student_steps = student_cfg.diffusion.sample_steps if ctx.options.get("student_run") else (2 if ctx.smoke else 4)
    ctx.record("setup", {"context_frames": context, "steps": steps, "guidance_scale": GUIDANCE_SCALE,
                         "dtype": "bfloat16 autocast" if ctx.cuda else "float32", "batch": 1,
                         "student": {"steps": student_steps, "source": student_source,
                                     "measures": "speed only (random weights: its quality is not measured)"
                                     if student_source == "random weights" else "speed of a trained student"},
                         "dense_compiled": "not offered: the sampler runs the dense baseline's steps eagerly"})
    eager = []
    for guided in GUIDANCE:
        eager += [Candidate(f"scd_{guided}", *models["scd"], steps, guided, "eager"),
                  Candidate(f"dense_{guided}", *models["dense"], steps, guided, "eager"),
                  Candidate(f"student_{guided}", student_model, student_cfg, student_steps, guided, "eager")]
    _phase(ctx, "eager", eager, context)
    if not ctx.cuda:
        ctx.record("compiled", {"status": NEEDS_CUDA, "reason": "compiling the decoder loop on CPU takes about a "
                                "minute, beyond --smoke"})
    else:
        compiled = []
        for guided in GUIDANCE:
            compiled += [Candidate(f"scd_{guided}", *models["scd"], steps, guided, "eager"),
                         Candidate(f"scd_{guided}_compiled", *models["scd"], steps, guided, "compiled"),
                         Candidate(f"student_{guided}_compiled", student_model, student_cfg, student_steps, guided,
                                   "compiled")]
        _phase(ctx, "compiled", compiled, context)


def _models(ctx: SectionContext) -> dict:
    from scd_train.models import build_model

    out = {}
    for key, arch, seed in (("scd", "scd", 21), ("dense", "causal_dit", 22)):
        cfg = model_config(ctx, arch)
        torch.manual_seed(0)
        out[key] = (randomize(build_model(cfg.model), seed).to(ctx.device).eval(), cfg)
    return out


def _student(ctx: SectionContext, scd: tuple) -> tuple:
    run_dir = ctx.options.get("student_run")
    if not run_dir:
        return scd[0], scd[1], "random weights"
    from scd_train.weights import load_model

    model, cfg = load_model(run_dir, device=ctx.device)
    return model.eval(), cfg, str(run_dir)


def _autocast(ctx: SectionContext) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if ctx.cuda else contextlib.nullcontext()


def _open_stream(ctx: SectionContext, c: Candidate, context: int, capacity: int) -> None:
    import time

    from scd_train.diffusion.sampling import SamplerSettings, new_stream

    d = c.cfg.diffusion
    mode = d.cfg_mode if c.cfg.model.arch == "scd" else "action"
    settings = SamplerSettings(steps=c.steps, cfg_scale=GUIDANCE[c.guided], cfg_mode=mode,
                               num_train_timesteps=d.num_train_timesteps,
                               compile="on" if c.loop == "compiled" else "off")
    m = c.cfg.model
    generator = torch.Generator(device="cpu").manual_seed(31)
    frames = torch.randn(1, context, m.latent_channels, m.latent_height, m.latent_width, generator=generator)
    actions = torch.randint(0, max(m.num_actions, 1), (1, context), generator=generator) if m.num_actions else None
    c.stream = new_stream(c.model, settings, 1, capacity, torch.Generator(device=ctx.device).manual_seed(32))
    with _autocast(ctx):
        start = time.perf_counter()
        c.stream.warm_up()  # compiles (and captures) the loop where it is on, outside every timed frame
        c.compile_seconds = time.perf_counter() - start if c.loop == "compiled" else None
        c.stream.prefill(frames.to(ctx.device), None if actions is None else actions.to(ctx.device))


def _frame_call(ctx: SectionContext, c: Candidate):
    action = torch.zeros(1, dtype=torch.long, device=ctx.device) if c.cfg.model.num_actions else None

    def call() -> None:
        with _autocast(ctx):
            c.stream.next_frame(action)

    return call


def _phase(ctx: SectionContext, phase: str, candidates: list[Candidate], context: int) -> None:
    from scd_train.metrics.timing import interleaved, time_call

    target = 2 if ctx.smoke else 10
    warmup = 2  # the first frame encodes the whole prefill; the second is the first steady one
    try:
        ctx.need(20 if phase == "compiled" else 10, f"inference {phase}")
        calls = {}
        for c in candidates:
            _open_stream(ctx, c, context, capacity=context + warmup + target + 1)
            calls[c.name] = _frame_call(ctx, c)
        estimate = {}
        for name, call in calls.items():
            time_call(call, ctx.device)  # prefill frame
            estimate[name] = time_call(call, ctx.device)[0]
        repeats = fit_repeats(ctx, list(estimate.values()), target=target)
        stats = interleaved(calls, repeats=repeats, warmup=0, device=ctx.device)
    except SkipForTime as skipped:
        ctx.record(phase, {"status": "skipped for time", "reason": str(skipped)})
        return
    except Exception as exc:  # the compiled phase failing must not lose the eager one
        ctx.record(phase, failure(exc))
        return
    ctx.record(phase, _report(ctx, candidates, stats, context, repeats))
    for c in candidates:
        c.stream = None


def _report(ctx: SectionContext, candidates: list[Candidate], stats: dict, context: int, repeats: int) -> dict:
    from scd_train.metrics.flops import generated_frame_flops

    rows = {}
    for c in candidates:
        flops = generated_frame_flops(c.cfg.model, context, c.steps, c.guided == "guided")
        timing = getattr(c.stream, "last_timing", None)
        rows[c.name] = {"arch": c.cfg.model.arch, "steps": c.steps, "guided": c.guided, "loop": c.loop,
                        "frame_ms_median": stats[c.name].median * 1e3, "frame_ms_min": stats[c.name].minimum * 1e3,
                        "frame": timing_summary(stats[c.name]), "flops_per_frame": flops.total,
                        "last_frame_split_s": dataclasses.asdict(timing) if timing is not None else None,
                        "compile_seconds": c.compile_seconds,
                        "loop_mode": getattr(getattr(c.stream, "_loop", None), "mode", None)}
    ratios = {}
    for guided in GUIDANCE:
        scd = rows.get(f"scd_{guided}")
        for other in (f"dense_{guided}", f"scd_{guided}_compiled", f"student_{guided}", f"student_{guided}_compiled"):
            if scd and other in rows:
                # > 1: SCD-M eager is that many times faster (dense) / the other candidate is faster (compiled, student)
                key = (f"dense_over_scd_{guided}" if other.startswith("dense") else f"scd_over_{other}")
                num, den = (rows[other], scd) if other.startswith("dense") else (scd, rows[other])
                ratios[key] = {"wall_ratio": num["frame_ms_median"] / den["frame_ms_median"],
                               "flop_ratio": num["flops_per_frame"] / den["flops_per_frame"]}
    return {"repeats": repeats, "context_frames_at_start": context, "candidates": rows, "ratios": ratios}
