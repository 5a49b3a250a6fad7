"""Sample sheets: grid videos (context | ground truth | each model) and a PNG contact sheet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import Tensor

from scd_train.video import mark_generated, side_by_side, to_hwc_uint8, upscale, write_gif, write_mp4

HEADER_PX = 14


def _label_strip(text: str, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, HEADER_PX), (255, 255, 255))
    ImageDraw.Draw(img).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(img)


def context_column(truth: np.ndarray, context: int) -> np.ndarray:
    """The context frames, then the last one held for the generated part of the timeline."""
    held = np.repeat(truth[context - 1:context], truth.shape[0] - context, axis=0)
    return np.concatenate([truth[:context], held], axis=0)


def grid_video(truth: list[Tensor], samples: dict[str, list[Tensor]], context: int, scale: int = 1,
               truth_label: str = "ground truth") -> np.ndarray:
    """(T, H', W', 3) uint8: one row per clip, columns context | ground truth | each model; generated
    frames carry a red border."""
    rows = []
    for i, gt in enumerate(truth):
        gt_px = upscale(to_hwc_uint8(gt), scale)
        cells = [context_column(gt_px, context), gt_px]
        cells += [mark_generated(upscale(to_hwc_uint8(samples[name][i]), scale), context) for name in samples]
        rows.append(side_by_side(cells))
    frames, cell_w = rows[0].shape[0], upscale(to_hwc_uint8(truth[0][:1]), scale).shape[2]
    header = side_by_side([np.broadcast_to(_label_strip(label, cell_w), (frames, HEADER_PX, cell_w, 3))
                           for label in ["context", truth_label, *samples]])
    spacer = np.full((rows[0].shape[0], 2, rows[0].shape[2], 3), 255, np.uint8)
    parts = [header]
    for row in rows:
        parts += [row, spacer]
    return np.concatenate(parts[:-1], axis=1)


def write_grid_videos(truth: list[Tensor], samples: dict[str, list[Tensor]], context: int, out_dir: Path,
                      scale: int = 4, fps: int = 6) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = grid_video(truth, samples, context, scale)
    return [write_mp4(grid, out_dir / "grid.mp4", fps), write_gif(grid, out_dir / "grid.gif", fps)]


def contact_frame_indices(context: int, total: int, columns: int) -> list[int]:
    """The last two context frames, then generated frames spread evenly to the end."""
    lead = list(range(max(0, context - 2), context))
    generated = np.linspace(context, total - 1, max(1, columns - len(lead))).round().astype(int)
    return lead + sorted(set(generated.tolist()))


def write_contact_sheet(truth: list[Tensor], samples: dict[str, list[Tensor]], context: int, path: Path,
                        columns: int = 8) -> Path:
    """PNG of selected frames: for each clip a ground-truth row and one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = truth[0].shape[0]
    frames = contact_frame_indices(context, total, columns)
    rows, labels = [], []
    for i, gt in enumerate(truth):
        for name, video in [("truth", gt)] + [(n, samples[n][i]) for n in samples]:
            px = to_hwc_uint8(video[frames])
            rows.append(np.concatenate(list(np.pad(px, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)),
                                       axis=1))
            labels.append(f"clip {i}: {name}")
    image = np.concatenate(rows, axis=0)
    cell_h, cell_w = image.shape[0] / len(rows), image.shape[1] / len(frames)
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(frames), 0.4 + 0.9 * len(rows)), dpi=100)
    ax.imshow(image, interpolation="nearest")
    ax.set_yticks([(r + 0.5) * cell_h for r in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([(c + 0.5) * cell_w for c in range(len(frames))],
                  [f"t={t}" + ("" if t >= context else " (ctx)") for t in frames], fontsize=7)
    ax.tick_params(length=0)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
