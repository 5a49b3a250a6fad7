"""Bounds on latent values against the statistics recorded in the manifest, so finite but absurd
latents (a shard rescaled after encoding, a VAE whose scaling factor does not fit) are refused at
encode time, by ``scd-data verify`` and on the first read of a training run, instead of training
at a loss of 1e7.

All checks work on *normalized* latents, ``(raw - shift) * scale`` with the manifest's
normalization, which is what the model sees:

- every value of every sample: ``|normalized| <= MAX_NORMALIZED_ABS`` (checked per sample on every
  read, at the cost of one min/max per channel);
- the whole set at encode time: the normalized per-channel std in ``SET_STD_RANGE`` and
  ``|normalized mean| <= SET_MEAN_LIMIT`` (only ``scaling_factor`` can fail: ``channel_stats`` is
  0/1 by construction);
- a spot check of a few samples when a training run opens the shards: their normalized per-channel
  std at most ``SPOT_STD_FACTOR`` times, and their mean within ``SPOT_STD_FACTOR`` stds of, what
  the manifest's ``latent_stats`` imply;
- ``scd-data verify`` recomputes the statistics of every stored latent and compares them with
  ``latent_stats`` (they are computed from the same stored values, so they agree to rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from scd_train.data.manifest import Manifest, Normalization
from scd_train.errors import InputError
from scd_train.storage import StorageError

# 64 standard deviations: never reached by real latents (a Gaussian's largest of 1e9 draws is ~6),
# always reached by a set rescaled by orders of magnitude.
MAX_NORMALIZED_ABS = 64.0
SET_STD_RANGE = (1.0 / 8.0, 8.0)
SET_MEAN_LIMIT = 8.0
SPOT_STD_FACTOR = 4.0
SPOT_SAMPLES = 8
STATS_RTOL = 1e-3
# below this many values numpy's own conversion is cheaper than handing the array to torch
SMALL_ARRAY = 1 << 14


@functools.lru_cache(maxsize=8)
def _as_arrays(norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(norm.shift, dtype=np.float64), np.asarray(norm.scale, dtype=np.float64)


def normalized_extreme(channel_min: Sequence[float], channel_max: Sequence[float], norm: Normalization) -> float:
    """The largest |normalized value| implied by per-channel raw minima and maxima."""
    shift, scale = _as_arrays(norm)
    low = np.abs((np.asarray(channel_min, dtype=np.float64) - shift) * scale)
    high = np.abs((np.asarray(channel_max, dtype=np.float64) - shift) * scale)
    return float(np.maximum(low, high).max())


def channel_extremes(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) of (frames, C, H, W) latents; NaN or Inf anywhere shows in them.

    torch converts float16 to float32 with vector instructions (numpy converts one value at a time,
    about 5x slower); the min/max then run on a channel-major float32 copy.
    """
    if latents.dtype == np.float16 and latents.size > SMALL_ARRAY:
        values = torch.from_numpy(np.ascontiguousarray(latents)).float().numpy()
    else:
        values = latents.astype(np.float32, copy=False)
    flat = values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1)
    return flat.min(1).astype(np.float64), flat.max(1).astype(np.float64)


def sample_problem(latents: np.ndarray, norm: Normalization,
                   extremes: tuple[np.ndarray, np.ndarray] | None = None) -> str | None:
    """Why one sample's latents are out of bounds, or None; ``extremes`` from ``channel_extremes``."""
    low, high = extremes if extremes is not None else channel_extremes(latents)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return "latents contain NaN or Inf"
    extreme = normalized_extreme(low, high, norm)
    if not extreme <= MAX_NORMALIZED_ABS:
        shift, scale = _as_arrays(norm)
        worst = int(np.argmax(np.maximum(np.abs((low - shift) * scale), np.abs((high - shift) * scale))))
        return (f"latent values reach {extreme:.4g} standard deviations from the manifest's normalization (channel "
                f"{worst}: raw range [{low[worst]:.4g}, {high[worst]:.4g}]); at most {MAX_NORMALIZED_ABS:g} is "
                "plausible: the latents were rescaled or the manifest does not belong to them")
    return None


def set_statistics_problems(mean: Sequence[float], std: Sequence[float], norm: Normalization) -> list[str]:
    """Encode time: whole-set raw statistics seen through the chosen normalization."""
    shift, scale = _as_arrays(norm)
    norm_mean = (np.asarray(mean, dtype=np.float64) - shift) * scale
    norm_std = np.asarray(std, dtype=np.float64) * scale
    problems = []
    low, high = SET_STD_RANGE
    for c, (m, s) in enumerate(zip(norm_mean, norm_std)):
        if not low <= s <= high:
            problems.append(f"channel {c}: normalized std {s:.4g} is outside [{low:g}, {high:g}]")
        if not abs(m) <= SET_MEAN_LIMIT:
            problems.append(f"channel {c}: normalized mean {m:.4g} is outside "
                            f"[-{SET_MEAN_LIMIT:g}, {SET_MEAN_LIMIT:g}]")
    return problems


class StatsAccumulator:
    """Per-channel count, sum and sum of squares over (frames, C, H, W) latents, in float64."""

    def __init__(self) -> None:
        self.count, self.total, self.total_sq = 0, None, None

    def add(self, latents: np.ndarray) -> None:
        values = latents.astype(np.float64).transpose(1, 0, 2, 3).reshape(latents.shape[1], -1)
        if self.total is None:
            self.total, self.total_sq = np.zeros(values.shape[0]), np.zeros(values.shape[0])
        self.count += values.shape[1]
        self.total += values.sum(1)
        self.total_sq += (values ** 2).sum(1)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / self.count
        return mean, np.sqrt(np.maximum(self.total_sq / self.count - mean ** 2, 1e-12))


def expected_normalized(manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (mean, std) the normalized latents should have, from ``latent_stats``."""
    stats = manifest.raw.get("latent_stats") or {}
    mean, std = stats.get("mean"), stats.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == manifest.channels):
        if manifest.normalization.kind == "channel_stats":
            return np.zeros(manifest.channels), np.ones(manifest.channels)
        return None
    shift, scale = _as_arrays(manifest.normalization)
    return (np.asarray(mean) - shift) * scale, np.asarray(std) * scale


def spot_check_problem(samples: list[np.ndarray], manifest: Manifest) -> str | None:
    """Start-up check: do a few stored samples have the spread the manifest's statistics describe?"""
    expected = expected_normalized(manifest)
    if not samples or expected is None:
        return None
    acc = StatsAccumulator()
    for latents in samples:
        acc.add(latents)
    shift, scale = _as_arrays(manifest.normalization)
    mean, std = acc.mean_std()
    mean, std = (mean - shift) * scale, std * scale
    want_mean, want_std = expected
    for c in range(len(std)):
        limit = SPOT_STD_FACTOR * max(want_std[c], 1e-6)
        if std[c] > limit or abs(mean[c] - want_mean[c]) > limit:
            return (f"{len(samples)} sampled clips have normalized mean {mean[c]:.4g} and std {std[c]:.4g} in channel "
                    f"{c}, but the manifest's latent_stats imply mean {want_mean[c]:.4g} and std {want_std[c]:.4g}: "
                    "the shards were changed after encoding or the manifest does not belong to them")
    return None


def spot_check_readers(readers: Sequence, manifest: Manifest, count: int = SPOT_SAMPLES) -> str | None:
    """``spot_check_problem`` over ``count`` samples spread evenly over the shards' readers (objects with
    ``len()`` and ``read(i)``). Samples that fail to read are left to the loader, which reports them."""
    sizes = [len(r) for r in readers]
    total = sum(sizes)
    if total == 0:
        return None
    offsets = np.cumsum([0, *sizes])
    picked = []
    for global_id in np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64)):
        shard = int(np.searchsorted(offsets, global_id, side="right")) - 1
        try:
            picked.append(readers[shard].read(int(global_id - offsets[shard])).latents)
        except StorageError:
            raise  # the store failed, not the sample: not something to leave for later
        except InputError:
            continue
    return spot_check_problem(picked, manifest)


def statistics_mismatch(acc: StatsAccumulator, manifest: Manifest) -> str | None:
    """verify: statistics of every stored latent against the manifest's ``latent_stats``."""
    stats = manifest.raw.get("latent_stats") or {}
    if acc.count == 0 or not isinstance(stats.get("mean"), list) or not isinstance(stats.get("std"), list):
        return None
    mean, std = acc.mean_std()
    want_mean, want_std = np.asarray(stats["mean"], dtype=np.float64), np.asarray(stats["std"], dtype=np.float64)
    if want_mean.shape != mean.shape:
        return f"latent_stats lists {want_mean.size} channels but the latents have {mean.size}"
    tolerance = STATS_RTOL * np.maximum(want_std, 1e-6)
    bad = np.flatnonzero((np.abs(mean - want_mean) > tolerance) | (np.abs(std - want_std) > tolerance))
    if bad.size:
        c = int(bad[0])
        return (f"the stored latents have mean {mean[c]:.6g} and std {std[c]:.6g} in channel {c}, but the manifest's "
                f"latent_stats record {want_mean[c]:.6g} and {want_std[c]:.6g}: shards or manifest were changed "
                "after encoding")
    return None
