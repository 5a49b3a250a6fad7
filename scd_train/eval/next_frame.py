"""Next-frame prediction quality against the copy-last-frame baseline, in pixel space."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scd_train.sample import SampleRequest, rollout_clips


@dataclass
class NextFrameScore:
    model_psnr: float
    copy_last_psnr: float
    clips: int


# An exact prediction has infinite PSNR; capping it keeps a mean over clips finite and comparable.
PSNR_CAP_DB = 60.0


def psnr_per_clip(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (data range 1, capped at PSNR_CAP_DB) of each clip of frames shaped (N, ..., H, W)."""
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)
    return -10.0 * torch.log10(mse.clamp_min(floor))


@torch.no_grad()
def next_frame_score(model, cfg, clips: int, context: int, steps: int, seed: int = 0,
                     device: str | torch.device = "cpu") -> NextFrameScore:
    """Generate frame ``context`` of each held-out clip and compare with copying frame context-1."""
    request = SampleRequest(clips=clips, context=context, unroll=1, steps=steps, seed=seed)
    batch, rollout, codec = rollout_clips(model, cfg, request, device)
    truth = codec.decode(batch.latents[:, context].cpu())
    predicted = codec.decode(rollout.frames[:, context].cpu())
    copied = codec.decode(batch.latents[:, context - 1].cpu())
    return NextFrameScore(float(psnr_per_clip(predicted, truth).mean()),
                          float(psnr_per_clip(copied, truth).mean()), len(batch.keys))
