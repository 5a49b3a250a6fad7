"""Image VAEs stored as local diffusers folders: loading, identity, and frame <-> latent maps.

One loading path serves the small KL autoencoder ``scd-data train-vae`` makes and real VAEs
(AutoencoderKL, AutoencoderDC) saved with ``save_pretrained``. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderDC")
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class VaeInfo:
    """What identifies a VAE folder: its class, a hash of its config, and its compression."""

    path: str
    class_name: str
    config_sha256: str
    latent_channels: int
    spatial_compression: int
    scaling_factor: float
    shift_factor: float

    @property
    def id(self) -> str:
        return f"{self.class_name}:{Path(self.path).name}:{self.config_sha256[:12]}"

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "class": self.class_name, "config_sha256": self.config_sha256,
                "latent_channels": self.latent_channels, "spatial_compression": self.spatial_compression,
                "temporal_compression": 1, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


def read_vae_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers VAE folder: {CONFIG_FILE} is missing")
    config = json.loads(path.read_text())
    name = config.get("_class_name")
    if name not in SUPPORTED_CLASSES:
        raise ValueError(f"{path}: _class_name={name!r} is not a supported image VAE; expected one of "
                         f"{', '.join(SUPPORTED_CLASSES)} (video VAEs with temporal compression are not supported)")
    return config


def config_sha256(config: dict) -> str:
    """Hash of the architecture and normalization, ignoring bookkeeping keys such as the diffusers version."""
    relevant = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def vae_info(folder: str | Path) -> VaeInfo:
    config = read_vae_config(folder)
    name = config["_class_name"]
    if name == "AutoencoderDC":
        compression = 2 ** (len(config["encoder_block_out_channels"]) - 1)
    else:
        compression = 2 ** (len(config["block_out_channels"]) - 1)
    return VaeInfo(path=str(Path(folder).resolve()), class_name=name, config_sha256=config_sha256(config),
                   latent_channels=int(config["latent_channels"]), spatial_compression=compression,
                   scaling_factor=float(config.get("scaling_factor") or 1.0),
                   shift_factor=float(config.get("shift_factor") or 0.0))


def load_vae(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The VAE in eval mode on ``device``. fp16 is refused: it overflows to NaN latents."""
    if dtype == torch.float16:
        raise ValueError("float16 VAEs produce non-finite latents; use float32 (or bfloat16 on GPUs)")
    config = read_vae_config(folder)
    import diffusers
    from diffusers.utils import is_accelerate_available

    cls = getattr(diffusers, config["_class_name"])
    # diffusers' lazy (low-memory) loading needs accelerate; without it, load eagerly instead of
    # printing a warning on every call.
    model = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                low_cpu_mem_usage=is_accelerate_available())
    return model.to(device).eval().requires_grad_(False)


def frames_to_pixels(frames: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float in [-1, 1]."""
    return frames.float() / 127.5 - 1.0


@torch.no_grad()
def encode_pixels(vae, pixels: Tensor) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> raw latents (N, C, h, w); the KL posterior's mode, so encoding is deterministic."""
    param = next(vae.parameters())
    out = vae.encode(pixels.to(param.device, param.dtype))
    latents = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
    return latents.float()


@torch.no_grad()
def decode_latents(vae, latents: Tensor) -> Tensor:
    """Raw latents (N, C, h, w) -> pixels in [-1, 1], float32."""
    param = next(vae.parameters())
    return vae.decode(latents.to(param.device, param.dtype)).sample.float()
