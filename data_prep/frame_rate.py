"""Frame rates of the inputs: read before any encoding, so a set that mixes rates is refused (or
resampled to one rate) up front instead of being encoded into one dataset without a word.

Resampling keeps, for every output frame j at time j / target, the source frame nearest to that
time (frames are dropped when slowing down, repeated when speeding up); per-frame actions follow
the frames they lead into. What was done is recorded per clip (``fps``, ``source_fps``) and in the
manifest (``video.fps``, ``video.source_fps``, ``video.resample_fps``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from data_prep.inputs import VideoInput
from scd_train.errors import InputError

# Rates closer than this are the same rate (29.97 vs 30000/1001 from different containers).
SAME_RATE_TOLERANCE = 1e-3


def probe_fps(inp: VideoInput, default_fps: float) -> float | None:
    """The input's frame rate from its container header (no decoding); ``default_fps`` for image
    folders and arrays; None when the file cannot be opened (it is reported as a bad input later)."""
    if inp.kind != "video":
        return float(default_fps)
    import av

    try:
        with av.open(str(inp.path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return float(rate) if rate else float(default_fps)
    except Exception:  # noqa: BLE001 - damaged files are reported when they are decoded
        return None


def group_rates(rates: dict[str, float | None]) -> dict[float, list[str]]:
    """Input names by frame rate, rates within SAME_RATE_TOLERANCE merged."""
    groups: dict[float, list[str]] = defaultdict(list)
    for name, rate in rates.items():
        if rate is None:
            continue
        key = next((r for r in groups if abs(r - rate) <= SAME_RATE_TOLERANCE * max(r, rate)), rate)
        groups[key].append(name)
    return dict(sorted(groups.items()))


def check_uniform_rate(rates: dict[str, float | None], resample_fps: float | None, allow_mixed: bool) -> None:
    """Refuse inputs of several frame rates unless they are resampled to one or explicitly allowed."""
    groups = group_rates(rates)
    if len(groups) <= 1 or resample_fps is not None or allow_mixed:
        return
    parts = [f"{rate:g} fps ({len(names)} input(s), e.g. {names[0]})" for rate, names in groups.items()]
    raise InputError(f"the inputs have {len(groups)} frame rates: {'; '.join(parts)}. Pass --resample-fps N to "
                     "resample every input to N fps, or --allow-mixed-fps to keep each input's own rate "
                     "(recorded per clip and in the manifest)")


def resample_indices(frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Source frame index of every output frame: nearest in time, covering the input's duration."""
    if abs(source_fps - target_fps) <= SAME_RATE_TOLERANCE * max(source_fps, target_fps):
        return np.arange(frames)
    count = int(np.floor((frames - 1) * target_fps / source_fps + 1e-9)) + 1
    times = np.arange(count) / target_fps
    return np.minimum(np.floor(times * source_fps + 0.5).astype(np.int64), frames - 1)
