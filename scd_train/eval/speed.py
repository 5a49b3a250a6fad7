"""Streaming speed of SCD against the dense causal baseline at matched width and total depth."""

from __future__ import annotations

import dataclasses

import torch

from scd_train.config import Config
from scd_train.diffusion.sampling import Rollout, SamplerSettings, generate
from scd_train.metrics.flops import generated_frame_flops


@dataclasses.dataclass
class SpeedSettings:
    context: int = 16
    unroll: int = 6
    steps: int = 20
    guided: bool = False
    batch: int = 1


def paired_configs(cfg: Config) -> tuple[Config, Config]:
    """(SCD, dense baseline) of the same width; the baseline's depth is encoder + decoder layers."""
    scd = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="scd"))
    depth = cfg.model.encoder_layers + cfg.model.decoder_layers
    dense = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="causal_dit", layers=depth))
    return scd, dense


def timed_rollout(model: torch.nn.Module, cfg: Config, settings: SpeedSettings, dtype: torch.dtype) -> Rollout:
    """A rollout from random context latents; speed does not depend on what the weights learned."""
    m = cfg.model
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (settings.batch, settings.context, m.latent_channels, m.latent_height, m.latent_width)
    latents = torch.randn(shape, device=device, generator=generator)
    frames = settings.context + settings.unroll
    actions = (torch.randint(0, m.num_actions, (settings.batch, frames), device=device, generator=generator)
               if m.num_actions else None)
    sampler = SamplerSettings(steps=settings.steps, cfg_scale=2.0 if settings.guided else 1.0,
                              cfg_mode="decoder" if m.arch == "scd" else "action")
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return generate(model, latents, actions, settings.unroll, sampler, generator)


def measure_speed(model: torch.nn.Module, cfg: Config, settings: SpeedSettings,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Latency, throughput, calls and analytic FLOPs per generated frame (after a warm-up rollout)."""
    warm = dataclasses.replace(settings, context=min(settings.context, 4), unroll=2, steps=2)
    timed_rollout(model, cfg, warm, dtype)
    rollout = timed_rollout(model, cfg, settings, dtype)
    flops = generated_frame_flops(cfg.model, settings.context + 1, settings.steps, settings.guided)
    return {
        "first_frame_s": rollout.first_frame_seconds,
        "frame_s_median": rollout.steady_frame_seconds,
        "frames_per_s": settings.batch / rollout.steady_frame_seconds,
        "context_calls_per_frame": rollout.counts.context / settings.unroll,
        "denoise_calls_per_frame": rollout.counts.denoise / settings.unroll,
        "gflops_per_frame": {"context": flops.encoder / 1e9, "denoise": flops.decoder / 1e9,
                             "total": flops.total / 1e9},
    }


def compare_speed(scd_model, dense_model, scd_cfg: Config, dense_cfg: Config, settings: SpeedSettings,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Both models measured back to back, so machine load drifts hit them alike."""
    row = {"context_frames": settings.context,
           "scd": measure_speed(scd_model, scd_cfg, settings, dtype),
           "causal_dit": measure_speed(dense_model, dense_cfg, settings, dtype)}
    row["speedup"] = row["causal_dit"]["frame_s_median"] / row["scd"]["frame_s_median"]
    row["first_frame_speedup"] = row["causal_dit"]["first_frame_s"] / row["scd"]["first_frame_s"]
    row["flops_ratio"] = row["causal_dit"]["gflops_per_frame"]["total"] / row["scd"]["gflops_per_frame"]["total"]
    return row
