"""A LatentCodec backed by a diffusers VAE folder and the normalization recorded in a manifest."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from scd_train.data.manifest import Normalization
from scd_train.data.vae import decode_latents, encode_pixels, frames_to_pixels, load_vae, vae_info
from scd_train.data.vae_identity import compare


class VaeCodec:
    """uint8 frames <-> normalized latents through the same VAE that encoded the shards.

    Decoding runs frame by frame in chunks so long rollouts do not need one huge batch.
    """

    def __init__(self, vae_path: str | Path, normalization: Normalization, device: str | torch.device = "cpu",
                 expected: dict | None = None, chunk: int = 32, expected_label: str = "the latents") -> None:
        """``expected``: the manifest's ``vae`` block; the folder's config and weights must match it."""
        info = vae_info(vae_path)
        if expected is not None:
            compare(info.to_dict(), expected, f"VAE folder {vae_path}", expected_label)
        self.info, self.normalization, self.chunk = info, normalization, chunk
        self.vae = load_vae(vae_path, device)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.info.spatial_compression
        return self.info.latent_channels, height // f, width // f

    def encode(self, frames: Tensor) -> Tensor:
        lead, flat = frames.shape[:-3], frames.reshape(-1, *frames.shape[-3:])
        raw = torch.cat([encode_pixels(self.vae, frames_to_pixels(part)) for part in flat.split(self.chunk)])
        latents = self.normalization.normalize(raw.cpu())
        return latents.reshape(*lead, *latents.shape[1:])

    def decode(self, latents: Tensor) -> Tensor:
        lead, flat = latents.shape[:-3], latents.reshape(-1, *latents.shape[-3:])
        raw = self.normalization.denormalize(flat.float().cpu())
        pixels = torch.cat([decode_latents(self.vae, part).cpu() for part in raw.split(self.chunk)])
        frames = ((pixels + 1.0) / 2.0).clamp(0, 1)
        return frames.reshape(*lead, *frames.shape[1:])
