"""Frame <-> latent codecs. The space-to-depth codec is lossless and needs no weights."""

from __future__ import annotations

from typing import Protocol

import torch
from einops import rearrange
from torch import Tensor


class LatentCodec(Protocol):
    """Maps uint8 frames (..., 3, H, W) to normalized latents (..., C, h, w) and back."""

    def encode(self, frames: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor:
        """Float frames in [0, 1], shape (..., 3, H, W)."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]: ...


class SpaceToDepthCodec:
    """Pixels in [-1, 1] rearranged so each factor x factor patch becomes channels."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.factor
        return 3 * f * f, height // f, width // f

    def encode(self, frames: Tensor) -> Tensor:
        pixels = frames.float() / 127.5 - 1.0
        lead = pixels.shape[:-3]
        flat = rearrange(pixels.reshape(-1, *pixels.shape[-3:]), "n c (h p1) (w p2) -> n (c p1 p2) h w",
                         p1=self.factor, p2=self.factor)
        return flat.reshape(*lead, *flat.shape[1:])

    def decode(self, latents: Tensor) -> Tensor:
        lead = latents.shape[:-3]
        flat = rearrange(latents.reshape(-1, *latents.shape[-3:]).float(), "n (c p1 p2) h w -> n c (h p1) (w p2)",
                         p1=self.factor, p2=self.factor)
        return ((flat + 1.0) / 2.0).clamp(0, 1).reshape(*lead, *flat.shape[1:])


def to_uint8(frames: Tensor) -> Tensor:
    """[0, 1] floats -> uint8."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)
