"""Next-frame prediction quality against the copy-last-frame baseline, in pixel space."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scd_train.eval.metrics import PSNR_CAP_DB, psnr_from_mse
from scd_train.sample import SampleRequest, rollout_clips

__all__ = ["PSNR_CAP_DB", "NextFrameScore", "next_frame_score", "psnr_per_clip"]


@dataclass
class NextFrameScore:
    model_psnr: float
    copy_last_psnr: float
    clips: int


def psnr_per_clip(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (data range 1) of each clip's frames (..., 3, H, W), from the clip's mean squared error.

    An exact prediction gets the capped value ``PSNR_CAP_DB``, not inf.
    """
    mse = (prediction.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return psnr_from_mse(mse).float()


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
