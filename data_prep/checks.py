"""Option checks of the ``scd-data`` stages, run before anything is read or written, so a bad value
fails with the option named instead of half-way (a zero-frame tar, ``range() arg 3 must not be
zero``, a ``.tmp`` directory left behind)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from scd_train.config import SyntheticDataConfig
from scd_train.errors import InputError
from scd_train.storage import is_remote
from scd_train.storage.location import check_url


def _at_least(name: str, value, low) -> None:
    if value is None or not value >= low:
        raise InputError(f"{name} {value} must be at least {low}")


def _positive_rate(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} {value} must be a positive frame rate")


def _output_dir(name: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise InputError(f"{name} {path} exists and is not a directory")


def check_storage_url(name: str, url: str) -> None:
    try:
        check_url(url)
    except ValueError as exc:
        raise InputError(f"{name} {exc}") from None


def check_retry_options(retries: int, delay_s: float) -> None:
    """``--retries`` / ``--retry-delay`` of the commands that read or write s3:// locations."""
    _at_least("--retries", retries, 1)
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise InputError(f"--retry-delay {delay_s} must be a non-negative number of seconds")


def check_encode_options(opts) -> None:
    """``data_prep.encode.EncodeOptions``: every numeric option in range, paths of the right kind."""
    # 2 frames: the trainer's shortest clip (one context frame and one target)
    _at_least("--clip-frames", opts.clip_frames, 2)
    _at_least("--stride", opts.stride, 1)
    _at_least("--videos-per-shard", opts.videos_per_shard, 1)
    _at_least("--size height", opts.height, 1)
    _at_least("--size width", opts.width, 1)
    _at_least("encode batch", opts.encode_batch, 1)
    if opts.workers is not None:
        _at_least("--workers", opts.workers, 1)
    if opts.num_actions is not None:
        _at_least("--num-actions", opts.num_actions, 1)
    _positive_rate("--fps", opts.default_fps)
    _positive_rate("--resample-fps", getattr(opts, "resample_fps", None))
    if getattr(opts, "resample_fps", None) is not None and getattr(opts, "allow_mixed_fps", False):
        raise InputError("--resample-fps and --allow-mixed-fps exclude each other: resampling leaves one rate")
    if not Path(opts.inputs).is_dir():
        raise InputError(f"input directory {opts.inputs} does not exist")
    check_storage_url("--out", str(opts.out))
    if not is_remote(opts.out):
        _output_dir("--out", Path(opts.out))
    if opts.staging is not None:
        _output_dir("--staging", Path(opts.staging))
    check_retry_options(opts.retries, opts.retry_delay_s)
    from scd_train.parallel.runtime import check_device_option

    check_device_option(opts.device)


def check_vae_train_options(opts) -> None:
    """``data_prep.train_vae.VaeTrainOptions``."""
    for name in ("steps", "batch_size", "latent_channels", "base_channels", "max_frames"):
        _at_least(f"--{name.replace('_', '-')}", getattr(opts, name), 1)
    levels = math.log2(opts.compression) if opts.compression > 0 else -1
    if levels < 1 or levels != int(levels):
        raise InputError(f"--compression {opts.compression} must be a power of two (2, 4, 8, ...)")
    if opts.size < opts.compression or opts.size % opts.compression:
        raise InputError(f"--size {opts.size} must be a multiple of --compression {opts.compression}")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise InputError(f"--lr {opts.lr} must be a positive number")
    if not Path(opts.videos).is_dir():
        raise InputError(f"input directory {opts.videos} does not exist")
    _output_dir("--out", Path(opts.out))


def check_synth_options(out: Path, cfg: SyntheticDataConfig, seed: int, fps: int) -> None:
    """``scd-data synth``: values in range, and no mixing with videos made by other options in ``out``."""
    _at_least("--num-videos", cfg.num_videos, 2)
    _at_least("--frames", cfg.frames_per_video, 2)
    _at_least("--digit-scale", cfg.digit_scale, 1)
    _at_least("--digits", cfg.digits_per_video, 1)
    _at_least("--speed", cfg.speed, 0)
    _at_least("--fps", fps, 1)
    if 8 * cfg.digit_scale > cfg.image_size:
        raise InputError(f"--size {cfg.image_size} is smaller than the {8 * cfg.digit_scale}px digits of "
                         f"--digit-scale {cfg.digit_scale}")
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise InputError(f"--holdout-fraction {cfg.holdout_fraction} must be in [0, 1)")
    _output_dir("--out", out)
    info = out / "synth.json"
    if info.is_file():
        try:
            previous = json.loads(info.read_text())
        except json.JSONDecodeError:
            previous = {}
        now = {"seed": seed, "fps": fps, "synthetic": asdict(cfg)}
        changed = [k for k in now if previous.get(k) != now[k]]
        if changed:
            raise InputError(f"{out} holds videos made with other options ({', '.join(changed)} differ); a rerun "
                             "keeps existing videos, so use a new --out")
