"""Input videos: discovery, decoding (PyAV, image folders, .npy), per-frame actions, resize and crop."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scd_train.errors import InputError, MissingInput

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIX = ".npy"
ACTIONS_SUFFIX = ".actions.npy"


class BadInput(InputError):
    """One input cannot be used; the message says why. Counted and reported, never silently dropped."""


@dataclass(frozen=True)
class VideoInput:
    name: str  # path relative to the input root, posix separators
    path: Path
    kind: str  # "video", "frames" (a folder of images) or "array" (.npy)

    @property
    def actions_path(self) -> Path:
        base = self.path if self.kind == "frames" else self.path.with_suffix("")
        return base.with_name(base.name + ACTIONS_SUFFIX)

    @property
    def key_stem(self) -> str:
        """A tar-safe sample key prefix: no dots (webdataset splits keys at the first dot) or slashes."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.name)


def list_inputs(root: str | Path) -> list[VideoInput]:
    """Every video file, image folder and .npy array under ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"input directory {root} does not exist")
    found = []
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_dir():
            if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
                found.append(VideoInput(name, path, "frames"))
        elif path.name.endswith(ACTIONS_SUFFIX):
            continue
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            found.append(VideoInput(name, path, "video"))
        elif path.suffix.lower() == ARRAY_SUFFIX:
            found.append(VideoInput(name, path, "array"))
    stems: dict[str, str] = {}
    for inp in found:
        if inp.key_stem in stems:
            raise InputError(f"inputs {stems[inp.key_stem]!r} and {inp.name!r} map to the same sample key "
                             f"{inp.key_stem!r}; rename one")
        stems[inp.key_stem] = inp.name
    return found


def read_frames(inp: VideoInput, default_fps: float) -> tuple[np.ndarray, float]:
    """uint8 frames (T, H, W, 3) and the frame rate."""
    try:
        if inp.kind == "video":
            return _read_video(inp.path, default_fps)
        if inp.kind == "frames":
            return _read_image_folder(inp.path), default_fps
        return _read_array(inp.path), default_fps
    except BadInput:
        raise
    except Exception as exc:  # decoders raise many types on damaged files
        raise BadInput(f"unreadable ({type(exc).__name__}: {exc})") from None


def _read_video(path: Path, default_fps: float) -> tuple[np.ndarray, float]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise BadInput("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise BadInput("no decodable frames")
    return np.stack(frames), float(rate) if rate else default_fps


def _read_image_folder(path: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    if len({f.shape for f in frames}) != 1:
        raise BadInput("frames of different sizes")
    return np.stack(frames)


def _read_array(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.ndim != 4 or 3 not in (array.shape[1], array.shape[-1]):
        raise BadInput(f"array shape {array.shape} is not (T, H, W, 3) or (T, 3, H, W)")
    if array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise BadInput(f"array dtype {array.dtype}: expected uint8, or finite floats in [0, 1]")
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def read_actions(inp: VideoInput, frames: int, num_actions: int | None) -> np.ndarray:
    """Per-frame int64 action ids from ``<input>.actions.npy``; one per frame."""
    path = inp.actions_path
    if not path.is_file():
        raise BadInput(f"actions file {path.name} is missing (other inputs have actions)")
    try:
        actions = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BadInput(f"actions file unreadable ({exc})") from None
    if actions.ndim != 1 or actions.shape[0] != frames:
        raise BadInput(f"actions shape {actions.shape} but the video has {frames} frames")
    if not np.issubdtype(actions.dtype, np.integer):
        raise BadInput(f"actions dtype {actions.dtype} is not an integer type")
    if actions.size and actions.min() < 0:
        raise BadInput(f"negative action id {actions.min()} (ids count from 0)")
    if actions.size and num_actions is not None and actions.max() >= num_actions:
        raise BadInput(f"action id {actions.max()} but --num-actions {num_actions} allows [0, {num_actions - 1}]")
    return actions.astype(np.int64)


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float pixels (T, 3, height, width) in [-1, 1]: scale to cover, then centre-crop."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    h, w = pixels.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        if size != (h, w):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        pixels = pixels[..., top:top + height, left:left + width].clamp(-1, 1)
    return pixels.contiguous()
