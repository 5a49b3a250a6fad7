"""PNG figures of the probes (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from scd_train.eval.probes import ProbeResult
from scd_train.eval.sheets import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity_heatmaps(result: ProbeResult, path: Path) -> Path:
    """One step x step heatmap of feature cosine similarity per layer."""
    plt = _pyplot()
    layers = result.similarity.shape[0]
    cols = min(layers, 6)
    rows = math.ceil(layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 1.0, 2.2 * rows + 0.6), squeeze=False)
    low = min(0.0, float(result.similarity.min()))
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= layers:
            ax.axis("off")
            continue
        image = ax.imshow(result.similarity[i].numpy(), vmin=low, vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {i}", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("feature cosine similarity across denoising steps", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(fig, path)


def plot_depth_curves(result: ProbeResult, path: Path) -> Path:
    """Over depth: mean feature similarity across steps, and the share of attention to earlier
    frames (mean over steps, with the min-max range over steps shaded)."""
    plt = _pyplot()
    summary = result.summary()
    depth = np.arange(result.similarity.shape[0])
    share = result.earlier_share.numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(depth, summary["feature_similarity"]["mean_across_steps"], marker="o", label="mean over step pairs")
    left.plot(depth, summary["feature_similarity"]["first_vs_last_step"], marker="s", label="first vs last step")
    lowest = min(min(summary["feature_similarity"]["mean_across_steps"]),
                 min(summary["feature_similarity"]["first_vs_last_step"]))
    left.set(xlabel="layer", ylabel="cosine similarity", title="feature similarity across steps",
             ylim=(min(0.0, lowest) - 0.02, 1.02))
    left.legend(fontsize=7)
    right.plot(depth, share.mean(axis=1), marker="o")
    right.fill_between(depth, share.min(axis=1), share.max(axis=1), alpha=0.25)
    right.set(xlabel="layer", ylabel="share of attention", title="attention to earlier frames", ylim=(-0.02, 1.02))
    for ax in (left, right):
        ax.set_xticks(depth)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_attention_maps(result: ProbeResult, path: Path) -> Path:
    """Attention mass per key frame for every layer (mean over steps), and the share to earlier
    frames per layer and step."""
    plt = _pyplot()
    mass = result.frame_mass.mean(dim=1).numpy()  # (layers, key frames)
    share = result.earlier_share.numpy()  # (layers, steps)
    frames = mass.shape[1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.35 * mass.shape[0] + 2.0))
    im = left.imshow(mass, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
    left.set_xticks(range(frames), [str(f - frames + 1) for f in range(frames)], fontsize=6)
    left.set(xlabel="key frame (0 = the frame being denoised)", ylabel="layer", title="attention mass per frame")
    fig.colorbar(im, ax=left)
    im = right.imshow(share, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
    right.set(xlabel="denoising step", ylabel="layer", title="share to earlier frames")
    fig.colorbar(im, ax=right)
    for ax in (left, right):
        ax.set_yticks(range(mass.shape[0]))
    fig.tight_layout()
    return save_figure(fig, path)


def write_probe_plots(result: ProbeResult, out_dir: Path) -> list[Path]:
    return [plot_similarity_heatmaps(result, out_dir / "feature_similarity.png"),
            plot_depth_curves(result, out_dir / "depth_curves.png"),
            plot_attention_maps(result, out_dir / "attention_maps.png")]
