"""Rectified flow: x_t = (1 - s) x0 + s eps, velocity target eps - x0, logit-normal timesteps."""

from __future__ import annotations

import torch
from torch import Tensor

from scd_train.models.layers import CLEAN_TIMESTEP


def sample_timesteps(shape: tuple[int, ...], num_train_timesteps: int, logit_mean: float, logit_std: float,
                     device: torch.device) -> Tensor:
    """Integer-valued timesteps in [1, T] drawn per element with a logit-normal density.

    u = sigmoid(N(mean, std)) picks index floor(T u) of the descending table T, T-1, ..., 1.
    """
    u = torch.sigmoid(torch.randn(shape, device=device) * logit_std + logit_mean)
    index = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    return (num_train_timesteps - index).float()


def sample_clean_mask(batch: int, frames: int, ratio: float, device: torch.device) -> Tensor:
    """(B, F) bool: frame 0 always clean, each later frame clean with probability ``ratio``."""
    clean = torch.rand(batch, frames, device=device) < ratio
    clean[:, 0] = True
    return clean


def sigmas_from_timesteps(timesteps: Tensor, num_train_timesteps: int) -> Tensor:
    """Noise level in [0, 1]; the clean label (-1) maps to 0."""
    return (timesteps / num_train_timesteps).clamp(min=0.0)


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Broadcast ``sigma`` over the trailing (C, H, W) dims of ``x0``."""
    s = sigma.reshape(sigma.shape + (1,) * (x0.dim() - sigma.dim()))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def per_frame_mse(pred: Tensor, target: Tensor, frame_dims: int) -> Tensor:
    """Mean squared error over the last three (C, H, W) dims, in fp32."""
    diff = (pred.float() - target.float()) ** 2
    return diff.mean(dim=tuple(range(frame_dims, diff.dim())))


def masked_clip_mean(frame_loss: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean over frames where ``loss_mask`` is set, per clip (dim 0), then over clips.

    A clip with no noised frame contributes 0 instead of NaN.
    """
    weights = loss_mask.float()
    per_clip = (frame_loss * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp(min=1.0)
    return per_clip.mean()


def clean_timesteps_where(timesteps: Tensor, clean: Tensor) -> Tensor:
    return torch.where(clean, torch.full_like(timesteps, CLEAN_TIMESTEP), timesteps)
