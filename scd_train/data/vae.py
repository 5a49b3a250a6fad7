"""Image VAEs stored as local diffusers folders: loading, identity, and frame <-> latent maps.

One loading path serves the small KL autoencoder ``scd-data train-vae`` makes and real VAEs
(AutoencoderKL, AutoencoderDC) saved with ``save_pretrained``. Nothing is ever downloaded.

A VAE is identified by a hash of its config *and* of its weight files, so a folder whose weights
were retrained or swapped does not pass for the one that encoded a dataset. Weights stored in
float16 are loaded and run in float32: the overflow that makes float16 VAEs produce NaN latents
comes from float16 arithmetic, not from storage, and the upcast is exact.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from scd_train.errors import InputError, MissingInput
from scd_train.third_party import quiet_imports

SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderDC")
CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def diffusers_class(name: str):
    """A diffusers model class; diffusers imports lazily, so the import happens here, quietly."""
    with quiet_imports():
        import diffusers

        return getattr(diffusers, name)


@dataclass(frozen=True)
class VaeInfo:
    """What identifies a VAE folder: its class, hashes of its config and weights, and its compression."""

    path: str
    class_name: str
    config_sha256: str
    weights_sha256: str
    weights_dtype: str  # how the weights are stored ("float32", "float16", ...); they always run in float32
    latent_channels: int
    spatial_compression: int
    scaling_factor: float
    shift_factor: float

    @property
    def id(self) -> str:
        return f"{self.class_name}:{Path(self.path).name}:{self.config_sha256[:12]}"

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "class": self.class_name, "config_sha256": self.config_sha256,
                "weights_sha256": self.weights_sha256, "weights_dtype": self.weights_dtype,
                "latent_channels": self.latent_channels, "spatial_compression": self.spatial_compression,
                "temporal_compression": 1, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


def read_vae_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise MissingInput(f"VAE folder {folder} does not exist")
    if not path.is_file():
        raise MissingInput(f"{folder} is not a diffusers VAE folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in SUPPORTED_CLASSES:
        raise InputError(f"{path}: _class_name={name!r} is not a supported image VAE; expected one of "
                         f"{', '.join(SUPPORTED_CLASSES)} (video VAEs with temporal compression are not supported)")
    return config


def config_sha256(config: dict) -> str:
    """Hash of the architecture and normalization, ignoring bookkeeping keys such as the diffusers version."""
    relevant = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


@functools.lru_cache(maxsize=32)
def _hash_weights(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the folder's weight files (names and bytes); cached while size and mtime stay the same."""
    files = weight_files(folder)
    if not files:
        raise InputError(f"VAE folder {folder} holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    return _hash_weights(tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def stored_dtype(folder: str | Path) -> str:
    """The floating dtype the weights are stored in, read from safetensors headers ('unknown' otherwise)."""
    from safetensors import safe_open

    dtypes = set()
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            return "unknown"
        try:
            with safe_open(str(path), framework="pt") as f:
                dtypes.update(str(f.get_slice(k).get_dtype()) for k in f.keys())  # noqa: SIM118
        except Exception as exc:  # safetensors' SafetensorError on a damaged header
            raise InputError(f"VAE weights {path} are not a readable safetensors file ({exc})") from None
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    floating = sorted(names.get(d, d) for d in dtypes if d.startswith(("F", "BF")))
    return "+".join(floating) or "unknown"


def vae_info(folder: str | Path) -> VaeInfo:
    config = read_vae_config(folder)
    name = config["_class_name"]
    try:
        blocks = config["encoder_block_out_channels"] if name == "AutoencoderDC" else config["block_out_channels"]
        compression = 2 ** (len(blocks) - 1)
        latent_channels = int(config["latent_channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{Path(folder) / CONFIG_FILE}: {name} config lacks a usable {exc} entry") from None
    return VaeInfo(path=str(Path(folder).resolve()), class_name=name, config_sha256=config_sha256(config),
                   weights_sha256=weights_sha256(folder), weights_dtype=stored_dtype(folder),
                   latent_channels=latent_channels, spatial_compression=compression,
                   scaling_factor=float(config.get("scaling_factor") or 1.0),
                   shift_factor=float(config.get("shift_factor") or 0.0))


def load_vae(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The VAE in eval mode on ``device``. fp16 is refused: it overflows to NaN latents."""
    if dtype == torch.float16:
        raise InputError("float16 VAE arithmetic produces non-finite latents; use float32 (or bfloat16 on GPUs)")
    config = read_vae_config(folder)
    cls = diffusers_class(config["_class_name"])
    from diffusers.utils import is_accelerate_available

    # diffusers' lazy (low-memory) loading needs accelerate; without it, load eagerly instead of
    # printing a warning on every call.
    with quiet_imports():  # loading imports diffusers' quantizers, and through them torchao
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
