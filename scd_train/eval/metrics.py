"""Frame metrics computed from tensors, and their aggregation over frames, trajectories and clips.

Every frame tensor here is (N, 3, H, W) in [0, 1]. PSNR uses data range 1 and is capped at
``PSNR_CAP_DB``: an exact prediction has MSE 0 and infinite PSNR, which would turn any mean that
includes it into inf. The cap is reachable only by (nearly) exact frames, so it never changes the
value for a frame with any error above MSE 1e-10.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_CAP_DB = 100.0
"""PSNR reported for MSE <= 1e-10 (data range 1)."""

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mse": False, "lpips": False, "fvd": False}


def psnr_from_mse(mse: Tensor, cap_db: float = PSNR_CAP_DB) -> Tensor:
    """PSNR in dB for data range 1, elementwise, capped at ``cap_db`` instead of inf."""
    floor = 10.0 ** (-cap_db / 10.0)
    return 10.0 * torch.log10(1.0 / mse.double().clamp_min(floor))


def per_frame_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """(N,) mean squared error of each frame."""
    _check_pair(prediction, target)
    return (prediction.double() - target.double()).pow(2).flatten(1).mean(dim=1)


def per_frame_ssim(prediction: Tensor, target: Tensor) -> Tensor:
    """(N,) SSIM of each frame (torchmetrics defaults: Gaussian 11x11 window, sigma 1.5)."""
    _check_pair(prediction, target)
    return structural_similarity_index_measure(prediction.float(), target.float(), data_range=1.0,
                                               reduction="none").double()


def _check_pair(prediction: Tensor, target: Tensor) -> None:
    if prediction.shape != target.shape or prediction.ndim != 4 or prediction.shape[1] != 3:
        raise ValueError(f"expected two (N, 3, H, W) frame tensors of equal shape, got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")


def video_scores(prediction: Tensor, target: Tensor, lpips=None, per_frame_psnr: bool = False) -> dict[str, float]:
    """Metrics of one video's frames (T, 3, H, W) against the ground truth.

    PSNR is taken from the video's mean MSE (robust to exact frames); ``per_frame_psnr`` instead
    averages per-frame PSNR, as the reference evaluation does. ``lpips`` is a callable returning
    per-frame distances, or None to skip LPIPS.
    """
    mse = per_frame_mse(prediction, target)
    psnr = psnr_from_mse(mse).mean() if per_frame_psnr else psnr_from_mse(mse.mean())
    scores = {"mse": float(mse.mean()), "psnr": float(psnr), "ssim": float(per_frame_ssim(prediction, target).mean())}
    if lpips is not None:
        scores["lpips"] = float(lpips(prediction, target).double().mean())
    return scores


def horizon_scores(prediction: Tensor, target: Tensor, horizons: list[int]) -> dict[str, list[float]]:
    """PSNR and SSIM of single generated frames (T, 3, H, W) at each horizon h (1 = the first
    generated frame), so quality can be read before and after e.g. an encoder window's length."""
    frames = torch.tensor([h - 1 for h in horizons])
    pred, true = prediction[frames], target[frames]
    return {"psnr": psnr_from_mse(per_frame_mse(pred, true)).tolist(), "ssim": per_frame_ssim(pred, true).tolist()}


def best_of_k(values: Tensor, select: str) -> Tensor:
    """(V,) best trajectory per video from a (V, K) table; ``select`` is 'max' or 'min'."""
    if values.ndim != 2:
        raise ValueError(f"expected a (videos, trajectories) table, got shape {tuple(values.shape)}")
    if select == "max":
        return values.max(dim=1).values
    if select == "min":
        return values.min(dim=1).values
    raise ValueError(f"select={select!r}: expected 'max' or 'min'")


def selection_rule(metric: str, official: bool) -> str:
    """Which trajectory counts for ``metric``: the best one, except the reference evaluation's MSE,
    which keeps the worst (max) trajectory."""
    if metric == "mse" and official:
        return "max"
    return "max" if HIGHER_IS_BETTER[metric] else "min"
