"""Section 3: torchao FP8 on the SCD-M encoder against bf16, same weights, clips and noise.

Both models start from the same seed; the FP8 one has its encoder's block linears (qkv, attention
out, MLP) converted by the project's ``prepare_fp8`` (``precision.fp8.backend=torchao``, tensorwise
"current" scaling), the decoder stays bf16. Steps are timed interleaved on one device with the
single-device backend, first eagerly (what the trainer runs today), then with every encoder
block under ``torch.compile`` (where torchao fuses its casts, which is where FP8 is meant to pay).
"""

from __future__ import annotations

import importlib.util

import torch

from gpu_sections.common import (
    NEEDS_CUDA,
    SectionContext,
    SkipForTime,
    failure,
    model_config,
    relative_l2,
    timing_summary,
)
from gpu_sections.steps import TrainStep, fit_repeats, timed_warm_up


def run(ctx: SectionContext) -> None:
    if importlib.util.find_spec("torchao") is None:
        ctx.record("status", "torchao is not installed: make gpu-wheels carries it (see docs/gpu.md)")
        return
    import torchao

    sizes = ["data.batch_size=1", "data.clip_frames=4"] if ctx.smoke else ["data.batch_size=1"]
    precision = "bf16" if ctx.cuda else "fp32"
    # no LR warm-up: in a short run the weights must move for the losses to say anything
    base = ["train.backend=single", f"train.precision={precision}", "train.activation_checkpointing=false",
            "optim.warmup_steps=0", *sizes]
    fp8 = ["precision.fp8.enabled=true", "precision.fp8.backend=torchao", "precision.fp8.recipe=current",
           "precision.fp8.modules=[encoder]"] + ([] if ctx.cuda else ["precision.fp8.cpu_emulation=true"])
    ctx.record("setup", {"torchao": torchao.__version__, "baseline_precision": precision, "recipe": "current",
                         "fp8_modules": "encoder block linears", "emulated": not ctx.cuda,
                         "note": None if ctx.cuda else "CPU: torchao's float8 emulation, numerics only, no speed "
                         "claim"})
    phases = [("eager", False)] + ([("compiled", True)] if ctx.cuda else [])
    if not ctx.cuda:
        ctx.record("compiled", {"status": NEEDS_CUDA, "reason": "compiling SCD-M blocks on CPU is beyond --smoke"})
    for phase, compiled in phases:
        try:
            ctx.record(phase, _compare(ctx, base, fp8, compiled))
        except SkipForTime as skipped:
            ctx.record(phase, {"status": "skipped for time", "reason": str(skipped)})
        except Exception as exc:  # the compiled phase failing must not lose the eager one
            ctx.record(phase, failure(exc))
            _free(ctx)


def _compare(ctx: SectionContext, base: list[str], fp8: list[str], compiled: bool) -> dict:
    from scd_train.metrics.timing import interleaved

    ctx.need(30 if compiled else 10, f"fp8 {'compiled' if compiled else 'eager'}")
    variants = {"bf16": TrainStep.build(model_config(ctx, "scd", base), ctx.device, perturb=True),
                "fp8": TrainStep.build(model_config(ctx, "scd", base + fp8), ctx.device, perturb=True)}
    numerics = None if compiled else _encoder_numerics(variants)
    if compiled:
        for v in variants.values():
            _compile_encoder_blocks(v.backend.model)
    warm = timed_warm_up(variants)
    repeats = fit_repeats(ctx, [s[-1] for s in warm.values()], target=2 if ctx.smoke else 12)
    stats = interleaved({name: v.measured_step for name, v in variants.items()}, repeats=repeats, warmup=0,
                        device=ctx.device)
    bf16, low = variants["bf16"], variants["fp8"]
    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(low.losses, bf16.losses)]
    out = {"encoder_numerics": numerics, "warm_up_step_seconds": warm, "repeats": repeats,
           "fp8_layers": len(low.fp8.fp8_layers),
           "step_time_ratio_fp8_over_bf16": stats["fp8"].median / stats["bf16"].median,
           "loss_max_rel_diff": max(gaps), "loss_mean_rel_diff": sum(gaps) / len(gaps),
           "peak_memory_gb": {"bf16": bf16.peak_gb, "fp8": low.peak_gb}}
    for name, v in variants.items():
        out[name] = {"step": timing_summary(stats[name]), "step_ms_median": stats[name].median * 1e3,
                     "losses": v.losses}
    del variants
    _free(ctx)
    return out


@torch.no_grad()
def _encoder_numerics(variants: dict) -> dict:
    """The encoder's last hidden state, FP8 against bf16, same weights and clip, before any step: the
    direct measure (a short run's loss is dominated by the target's own variance)."""
    hidden = {}
    for name, v in variants.items():
        latents, actions = v.clips[0]
        encoder = v.backend.model.encoder
        encoder.eval()  # no action dropout: both variants must see the same conditioning
        with v.backend.autocast(), v.fp8.autocast():
            hidden[name] = encoder.forward_hidden(latents, actions)[0].float()
        encoder.train()
    return {"hidden_rel_l2": relative_l2(hidden["fp8"], hidden["bf16"]),
            "hidden_max_abs_diff": float((hidden["fp8"] - hidden["bf16"]).abs().max()),
            "hidden_reference_max_abs": float(hidden["bf16"].abs().max())}


def _compile_encoder_blocks(model) -> None:
    """``torch.compile`` each encoder block in place, where the FP8 linears are (identical blocks share
    one compiled graph); the decoder stays eager on both sides, so the ratio isolates the encoder."""
    for block in model.encoder.blocks:
        block.compile()


def _free(ctx: SectionContext) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
