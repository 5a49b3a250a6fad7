"""Encode-time bounds on the latents, with the same rules the readers apply later
(``scd_train.data.latent_checks``), so freshly encoded data always passes verification and
training, and data that would not is refused before a manifest exists.

Each encode job records every video's per-channel raw minimum and maximum; once the set's
statistics (and so its normalization) are known, each video's extremes are normalized and
compared with the per-value bound, and the whole set's normalized mean and std with their range.
"""

from __future__ import annotations

import numpy as np

from scd_train.data.latent_checks import MAX_NORMALIZED_ABS, normalized_extreme, set_statistics_problems
from scd_train.data.manifest import Normalization
from scd_train.errors import InputError


def video_extremes(samples: list[dict]) -> dict[str, list[list[float]]]:
    """{video name: [per-channel minima, per-channel maxima]} over the job's samples."""
    out: dict[str, list[np.ndarray]] = {}
    for s in samples:
        lat = s["latents"]
        low, high = lat.min(axis=(0, 2, 3)).astype(np.float64), lat.max(axis=(0, 2, 3)).astype(np.float64)
        name = s["meta"]["video"]
        if name in out:
            out[name] = [np.minimum(out[name][0], low), np.maximum(out[name][1], high)]
        else:
            out[name] = [low, high]
    return {name: [low.tolist(), high.tolist()] for name, (low, high) in out.items()}


def check_encoded_statistics(opts, normalization: dict, mean: np.ndarray, std: np.ndarray,
                             records: list[dict]) -> None:
    """Refuse (no manifest) a set whose normalization does not fit it or that holds absurd values."""
    norm = Normalization.from_dict(normalization, len(mean), "the new manifest")
    problems = set_statistics_problems(mean, std, norm)
    if problems:
        hint = (" (the VAE's scaling_factor/shift_factor do not fit these latents: use --normalization "
                "channel_stats)" if norm.kind == "scaling_factor" else "")
        raise InputError(f"--normalization {norm.kind} gives latents far from unit scale: {'; '.join(problems[:3])}"
                         f"{hint}; no manifest was written")
    outliers = []
    for record in records:
        for video, (low, high) in (record.get("extremes") or {}).items():
            extreme = normalized_extreme(low, high, norm)
            if not extreme <= MAX_NORMALIZED_ABS:
                outliers.append((extreme, video))
    if outliers:
        outliers.sort(reverse=True)
        listed = ", ".join(f"{video} ({extreme:.3g})" for extreme, video in outliers[:5])
        raise InputError(f"{len(outliers)} input(s) have latents more than {MAX_NORMALIZED_ABS:g} standard deviations "
                         f"from the set's normalization: {listed}; remove them (or check the VAE) and rerun with "
                         f"--overwrite; no manifest was written to {opts.out}")
