"""Section 2: the SCD-M training step as the trainer runs it, FSDP2 on one rank, bf16.

Two copies of SCD-M (same seed) are wrapped by the project's FSDP2 backend in one single-process
group (NCCL on CUDA, gloo on CPU), one with activation checkpointing and one without, and their
steps (forward + backward + clip + AdamW) are timed interleaved on the same clips. FLOPs are the
project's analytic counts (``metrics.flops.train_step_flops``): model FLOPs, so the recomputation
that activation checkpointing adds shows as a lower MFU rather than as extra work.
"""

from __future__ import annotations

from gpu_sections.common import SectionContext, allocated_gb, model_config, timing_summary
from gpu_sections.steps import TrainStep, fit_repeats, timed_warm_up

AC_OFF, AC_ON = "activation_checkpointing_off", "activation_checkpointing_on"


def run(ctx: SectionContext) -> None:
    from scd_train.metrics.flops import detect_peak_tflops, tokens_per_frame, train_step_flops
    from scd_train.metrics.timing import interleaved

    sizes = ["data.batch_size=1", "data.clip_frames=4"] if ctx.smoke else []  # GPU: scd_m.yaml's 2 x 300 frames
    precision = "bf16" if ctx.cuda else "fp32"
    base = ["train.backend=fsdp2", f"train.precision={precision}", *sizes]
    variants = {name: TrainStep.build(model_config(ctx, "scd", [*base, f"train.activation_checkpointing={flag}"]),
                                      ctx.device)
                for name, flag in ((AC_OFF, "false"), (AC_ON, "true"))}
    cfg = variants[AC_OFF].cfg
    tokens = cfg.data.batch_size * cfg.data.clip_frames * tokens_per_frame(cfg.model)
    ctx.record("setup", {"backend": "fsdp2", "world_size": 1, "precision": precision,
                         "clips_per_step": cfg.data.batch_size, "clip_frames": cfg.data.clip_frames,
                         "encoder_tokens_per_step": tokens,
                         "resident_memory_gb_after_build": allocated_gb(ctx.device)})
    ctx.need(10, "training warm-up")
    warm = timed_warm_up(variants)  # the first step compiles FlexAttention's forward and backward
    ctx.record("warm_up_step_seconds", warm)
    repeats = fit_repeats(ctx, [s[-1] for s in warm.values()], target=2 if ctx.smoke else 8)
    stats = interleaved({name: v.measured_step for name, v in variants.items()}, repeats=repeats, warmup=0,
                        device=ctx.device)
    peak_tflops = detect_peak_tflops(ctx.device)
    flops = train_step_flops(cfg)
    results = {}
    for name, v in variants.items():
        step_s = stats[name].median
        enc, dec = flops.encoder / step_s / 1e12, flops.decoder / step_s / 1e12
        row = {"step": timing_summary(stats[name]), "step_ms_median": step_s * 1e3, "tokens_per_s": tokens / step_s,
               "clips_per_s": cfg.data.batch_size / step_s, "tflops": enc + dec, "tflops_encoder": enc,
               "tflops_decoder": dec, "peak_memory_gb": v.peak_gb, "losses": v.losses,
               "losses_finite": all(loss == loss and abs(loss) != float("inf") for loss in v.losses)}
        if peak_tflops:
            row.update({"mfu": (enc + dec) / peak_tflops, "mfu_encoder": enc / peak_tflops,
                        "mfu_decoder": dec / peak_tflops})
        results[name] = row
    ctx.record("variants", results)
    ctx.record("summary", {
        "repeats": repeats, "flops_per_step": {"encoder": flops.encoder, "decoder": flops.decoder},
        "peak_bf16_tflops": peak_tflops,
        "mfu": None if peak_tflops else "not computed: the device's dense bf16 peak is unknown (CPU, unlisted GPU)",
        "checkpointing_step_time_ratio": stats[AC_ON].median / stats[AC_OFF].median,
        "checkpointing_memory_ratio": (results[AC_ON]["peak_memory_gb"] / results[AC_OFF]["peak_memory_gb"]
                                       if results[AC_OFF]["peak_memory_gb"] else None),
        # same weights, clips and noise: checkpointing recomputes, it must not change the numbers
        "max_loss_diff_on_vs_off": max(abs(a - b) for a, b in zip(results[AC_ON]["losses"],
                                                                 results[AC_OFF]["losses"])),
    })
