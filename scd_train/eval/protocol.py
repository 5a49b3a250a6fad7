"""The evaluation protocol: how many frames condition, how many are generated, how many tries.

Presets:
  * ``tiny``: a few short clips of the embedded synthetic data (minutes on a CPU).
  * ``minecraft``: the paper's TECO-Minecraft settings (144 context + 156 generated frames,
    4 trajectories per clip, best of 4, 256 clips, 50 steps), with metrics computed correctly.
  * ``minecraft-official``: the same settings with the reference evaluation's quirks reproduced
    (see ``compat``), for numbers comparable with the paper's tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from scd_train.config import ConfigError, from_dict


@dataclass
class EvalProtocol:
    # Ground-truth frames each rollout is conditioned on.
    context: int = 4
    # Frames generated after the context.
    unroll: int = 12
    # Rollouts per clip with different noise; PSNR, SSIM and LPIPS keep the best one per clip.
    trajectories: int = 2
    # Held-out clips evaluated: the first ones, in the data's fixed order.
    clips: int = 8
    # Clips per rollout batch; each is repeated ``trajectories`` times inside the batch.
    batch_clips: int = 4
    # Denoising steps per frame; null uses each model's diffusion.sample_steps.
    steps: int | None = None
    # Guidance scale; null uses each model's diffusion.cfg_scale.
    cfg_scale: float | None = None
    # Seed of rollout batch i is seed + i, identical for every model evaluated.
    seed: int = 0
    # "none": metrics from tensors, PSNR from each video's mean MSE, best-of-k for every metric,
    # LPIPS on correctly scaled inputs. "official": reproduce the reference evaluation: frames go
    # through a lossy H.264 round trip (ground truth and sample side by side, as it writes them),
    # PSNR is the mean of per-frame PSNR, MSE keeps the worst trajectory, and LPIPS receives [0, 1]
    # frames without rescaling to [-1, 1].
    compat: Literal["none", "official"] = "none"
    # x264 CRF of the official mode's round trip; imageio-ffmpeg's default quality 5 maps to 25.
    mp4_crf: int = 25
    # Generated-frame indices (1 = the first generated frame) at which PSNR and SSIM are also
    # reported one frame at a time ("by_horizon" in eval.json), e.g. before and after a model's
    # encoder window; empty: none.
    horizons: list[int] = dataclasses.field(default_factory=list)
    # The sampler's decoder loop (auto / on / off); null uses each model's diffusion.sample_compile.
    compile: str | None = None

    @property
    def frames(self) -> int:
        return self.context + self.unroll

    @property
    def official(self) -> bool:
        return self.compat == "official"


def _minecraft(compat: str) -> EvalProtocol:
    return EvalProtocol(context=144, unroll=156, trajectories=4, clips=256, batch_clips=2, steps=50, compat=compat)


PRESETS: dict[str, EvalProtocol] = {
    "tiny": EvalProtocol(),
    "minecraft": _minecraft("none"),
    "minecraft-official": _minecraft("official"),
}


def build_protocol(preset: str, overrides: dict | None = None) -> EvalProtocol:
    """A preset with ``overrides`` (field -> value; None values are ignored), validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown evaluation preset {preset!r}; choose one of {sorted(PRESETS)}")
    merged = {**dataclasses.asdict(PRESETS[preset]),
              **{k: v for k, v in (overrides or {}).items() if v is not None}}
    protocol = from_dict(EvalProtocol, merged, prefix="eval.")
    validate_protocol(protocol)
    return protocol


def validate_protocol(p: EvalProtocol) -> None:
    for name in ("context", "unroll", "trajectories", "clips", "batch_clips"):
        if getattr(p, name) < 1:
            raise ConfigError(f"eval.{name}={getattr(p, name)} must be >= 1")
    if p.steps is not None and p.steps < 1:
        raise ConfigError(f"eval.steps={p.steps} must be >= 1 or null")
    if not 0 <= p.mp4_crf <= 51:
        raise ConfigError(f"eval.mp4_crf={p.mp4_crf} must be in [0, 51]")
    bad = [h for h in p.horizons if not 1 <= h <= p.unroll]
    if bad:
        raise ConfigError(f"eval.horizons={p.horizons}: {bad} outside the generated frames 1..{p.unroll} "
                          f"(eval.unroll={p.unroll})")
    if p.compile not in (None, "auto", "on", "off"):
        raise ConfigError(f"eval.compile={p.compile!r} is not one of 'auto', 'on', 'off'")
