"""Writing videos: mp4 through PyAV, gif through Pillow, and side-by-side panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def to_hwc_uint8(frames: Tensor) -> np.ndarray:
    """(T, 3, H, W) floats in [0, 1] -> (T, H, W, 3) uint8."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def side_by_side(panels: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Concatenate (T, H, W, 3) videos horizontally with a white gap."""
    t, h = panels[0].shape[:2]
    spacer = np.full((t, h, gap, 3), 255, dtype=np.uint8)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(spacer)
        parts.append(p)
    return np.concatenate(parts, axis=2)


def mark_generated(frames: np.ndarray, first_generated: int, colour=(255, 64, 64), width: int = 2) -> np.ndarray:
    """Frame generated frames with a coloured border so context and rollout are told apart."""
    out = frames.copy()
    c = np.array(colour, dtype=np.uint8)
    g = out[first_generated:]
    g[:, :width], g[:, -width:], g[:, :, :width], g[:, :, -width:] = c, c, c, c
    return out


def write_mp4(frames: np.ndarray, path: Path | str, fps: int = 8, crf: int = 18, preset: str = "veryfast",
              lossless: bool = False) -> Path:
    """H.264 (yuv420p) mp4 of (T, H, W, 3) uint8 frames; odd sides are padded by one pixel.

    ``lossless`` stores the RGB values exactly (libx264rgb, crf 0): decoding gives back the very
    frames written, at the price of larger files that browsers may not play. Game recordings use it,
    because chroma subsampling blurs the one-pixel detail of pixel-art games.
    """
    import av

    path = Path(path)
    t, h, w = frames.shape[:3]
    pad_h, pad_w = (0, 0) if lossless else (h % 2, w % 2)  # yuv420p needs even sides
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = {"crf": "0" if lossless else str(crf), "preset": preset}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def read_mp4(path: Path | str) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of the first video stream."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_gif(frames: np.ndarray, path: Path | str, fps: int = 8) -> Path:
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    tmp.replace(path)
    return path
