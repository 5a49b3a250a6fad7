"""``scd-data train-vae``: a small convolutional KL autoencoder trained on a folder of videos.

It is diffusers' own AutoencoderKL with a small config, saved with ``save_pretrained``, so the
encoder, the sampler and the evaluation load it exactly as they load a released VAE.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_prep.checks import check_vae_train_options
from data_prep.inputs import BadInput, list_inputs, read_frames, resize_crop
from scd_train.errors import InputError, MissingInput


class OutputExists(InputError, FileExistsError):
    """The output folder exists and --overwrite was not given."""


@dataclass
class VaeTrainOptions:
    videos: Path
    out: Path
    size: int = 64
    latent_channels: int = 4
    compression: int = 8
    base_channels: int = 16
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6
    max_frames: int = 20000
    seed: int = 0
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True


def tiny_vae_config(latent_channels: int, compression: int, base_channels: int, size: int) -> dict:
    levels = int(math.log2(compression))
    if 2 ** levels != compression:
        raise InputError(f"--compression {compression} must be a power of two")
    channels = [base_channels * min(2 ** i, 2) for i in range(levels + 1)]
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * (levels + 1),
                up_block_types=["UpDecoderBlock2D"] * (levels + 1), block_out_channels=channels, layers_per_block=1,
                latent_channels=latent_channels, norm_num_groups=min(8, base_channels), sample_size=size,
                mid_block_add_attention=False)


def load_training_frames(opts: VaeTrainOptions) -> tuple[torch.Tensor, list[str]]:
    """uint8 frames (N, 3, S, S) from every readable input, evenly thinned to at most ``max_frames``."""
    chunks, bad = [], []
    inputs = list_inputs(opts.videos)
    if not inputs:
        raise MissingInput(f"no videos, image folders or .npy arrays under {opts.videos}")
    for inp in tqdm(inputs, desc="read", unit="video", disable=not opts.progress):
        try:
            frames, _ = read_frames(inp, default_fps=8.0)
        except BadInput as exc:
            bad.append(f"{inp.name}: {exc}")
            continue
        pixels = resize_crop(frames, opts.size, opts.size)
        chunks.append(((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    if not chunks:
        raise InputError(f"none of the {len(inputs)} inputs under {opts.videos} could be read: {bad[:3]}")
    frames = torch.cat(chunks)
    if len(frames) > opts.max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, opts.max_frames).round().astype(np.int64)]
    return frames, bad


def train_vae(opts: VaeTrainOptions) -> dict:
    from scd_train.data.vae import diffusers_class

    AutoencoderKL = diffusers_class("AutoencoderKL")  # noqa: N806

    check_vae_train_options(opts)
    if opts.out.exists() and not opts.overwrite:
        raise OutputExists(f"{opts.out} exists; pass --overwrite to replace it")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    frames, bad = load_training_frames(opts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL(**tiny_vae_config(opts.latent_channels, opts.compression, opts.base_channels, opts.size))
    vae.to(device).train()
    optim = torch.optim.AdamW(vae.parameters(), lr=opts.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=opts.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(opts.seed)
    start, losses = time.perf_counter(), []
    bar = tqdm(range(opts.steps), desc="train-vae", unit="step", disable=not opts.progress)
    for _ in bar:
        idx = torch.randint(len(frames), (opts.batch_size,), generator=gen)
        x = (frames[idx].float() / 127.5 - 1.0).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        loss = rec_loss + opts.kl_weight * posterior.kl().mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(rec_loss.item())
        bar.set_postfix(rec=f"{np.mean(losses[-20:]):.4f}")
    vae.eval()
    quality = _measure(vae, frames, device)
    # the inverse latent std makes scaling_factor a sensible normalization for this VAE
    vae.register_to_config(scaling_factor=1.0 / quality.pop("latent_std"), shift_factor=quality.pop("latent_mean"))
    report = {"steps": opts.steps, "seconds": time.perf_counter() - start, "final_rec_loss": float(
        np.mean(losses[-20:])), "frames": len(frames), "unreadable_inputs": bad, **quality,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}}
    _save(vae.cpu(), opts.out, report)
    return report


@torch.no_grad()
def _measure(vae, frames: torch.Tensor, device: torch.device, count: int = 256) -> dict:
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(np.int64)
    x = frames[idx].float().to(device) / 127.5 - 1.0
    z = torch.cat([vae.encode(part).latent_dist.mode() for part in x.split(64)])
    recon = torch.cat([vae.decode(part).sample for part in z.split(64)]).clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    return {"psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)), "latent_mean": float(z.mean()),
            "latent_std": float(z.std())}


def _save(vae, out: Path, report: dict) -> None:
    """save_pretrained into a temporary sibling, then swap it in, so ``out`` is always complete or absent."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp))
    (tmp / "training.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
