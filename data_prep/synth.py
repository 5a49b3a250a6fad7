"""``scd-data synth``: the embedded moving-digits set as real mp4 files plus per-frame action files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from data_prep.inputs import ACTIONS_SUFFIX
from data_prep.writers import atomic_save_npy
from scd_train.config import SyntheticDataConfig
from scd_train.data.synthetic import ACTION_NAMES, render_video, split_indices
from scd_train.video import write_mp4


def write_synthetic(out: Path, cfg: SyntheticDataConfig, seed: int, fps: int = 8, progress: bool = True) -> dict:
    """Write ``out/train`` and ``out/holdout``; files already complete are kept, so a rerun only fills gaps."""
    train, held = split_indices(cfg)
    written = 0
    jobs = [("train", i) for i in train] + [("holdout", i) for i in held]
    for split in ("train", "holdout"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for split, index in tqdm(jobs, desc="synth", unit="video", disable=not progress):
        stem = out / split / f"synthetic-{index:06d}"
        video = stem.with_suffix(".mp4")
        if video.is_file():
            continue
        frames, actions = render_video(cfg, seed, index)
        atomic_save_npy(stem.with_name(stem.name + ACTIONS_SUFFIX), actions)  # before the video: video => actions
        write_mp4(frames.transpose(0, 2, 3, 1), video, fps)
        written += 1
    info = {"seed": seed, "fps": fps, "num_actions": len(ACTION_NAMES), "action_names": list(ACTION_NAMES),
            "train_videos": len(train), "holdout_videos": len(held), "synthetic": asdict(cfg)}
    (out / "synth.json").write_text(json.dumps(info, indent=2))
    return {"written": written, "kept": len(jobs) - written, **info}
