"""The latent dataset contract: ``manifest.json`` written by ``scd-data encode``, checked on open.

It records which VAE made the latents (id and config hash), the latent shape and dtype, how to
normalize them, the clip length, stride and fps, and every shard with its sample count, size and
sha256. Training refuses data whose manifest disagrees with the model config instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scd_train.errors import InputError
from scd_train.storage import Location, RetryPolicy, is_remote, open_location

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("webdataset", "mds")
LATENT_DTYPES = ("float16", "float32")


class ManifestError(InputError):
    """The manifest is missing, malformed, or disagrees with the config."""


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the dataset directory
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Normalization:
    """normalized = (raw - shift) * scale, per channel."""

    kind: str  # "channel_stats" or "scaling_factor"
    shift: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def from_dict(cls, obj: dict, channels: int, where: str) -> Normalization:
        kind = obj.get("kind")
        if kind == "channel_stats":
            mean, std = obj.get("mean"), obj.get("std")
            if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels):
                raise ManifestError(f"{where}: normalization 'channel_stats' needs 'mean' and 'std' lists of "
                                    f"{channels} values (latent channels)")
            if not all(s > 0 for s in std):
                raise ManifestError(f"{where}: normalization std {std} has non-positive entries")
            return cls(kind, tuple(map(float, mean)), tuple(1.0 / float(s) for s in std))
        if kind == "scaling_factor":
            factor, shift = obj.get("scaling_factor"), obj.get("shift_factor", 0.0) or 0.0
            if not isinstance(factor, (int, float)) or factor <= 0:
                raise ManifestError(f"{where}: normalization 'scaling_factor' needs a positive scaling_factor, "
                                    f"got {factor!r}")
            return cls(kind, (float(shift),) * channels, (float(factor),) * channels)
        raise ManifestError(f"{where}: normalization kind {kind!r} is not 'channel_stats' or 'scaling_factor' "
                            "(a manifest without normalization is refused rather than assumed to be 1.0)")

    def _view(self, values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1)

    def normalize(self, raw: Tensor) -> Tensor:
        return (raw.float() - self._view(self.shift, raw)) * self._view(self.scale, raw)

    def denormalize(self, latents: Tensor) -> Tensor:
        return latents.float() / self._view(self.scale, latents) + self._view(self.shift, latents)


@dataclass(frozen=True)
class Manifest:
    root: Location  # the shard directory: a local path or an s3:// prefix
    raw: dict
    frames: int
    channels: int
    height: int
    width: int
    dtype: str
    normalization: Normalization
    has_actions: bool
    num_action_classes: int
    shards: dict[str, list[ShardEntry]]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.frames, self.channels, self.height, self.width

    @property
    def vae(self) -> dict:
        return self.raw["vae"]

    def shards_for(self, fmt: str) -> list[ShardEntry]:
        entries = self.shards.get(fmt)
        if not entries:
            have = ", ".join(sorted(k for k, v in self.shards.items() if v)) or "none"
            raise ManifestError(f"{self.root / MANIFEST} lists no {fmt} shards (formats present: {have}); "
                                f"encode with --format {fmt} or set data.source to a present format")
        return entries

    def fingerprint(self, fmt: str) -> str:
        """Identity of the shard set, stored with the data position so a resume on other data fails."""
        text = "\n".join(f"{s.path}:{s.samples}:{s.sha256}" for s in self.shards_for(fmt))
        return hashlib.sha256(text.encode()).hexdigest()


def _get(obj: dict, key: str, kind: type | tuple, where: str):
    if key not in obj:
        raise ManifestError(f"{where}: required key '{key}' is missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"{where}: '{key}'={value!r} has the wrong type")
    return value


def load_manifest(root: str | Path | Location, source: str = "data.path", retry: RetryPolicy | None = None) -> Manifest:
    """Read and check ``root/manifest.json``; ``source`` names the setting ``root`` came from, for errors."""
    try:
        root = open_location(root, retry)
    except ValueError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(_no_manifest(root, path, source))
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    where = str(path)
    version = _get(raw, "version", int, where)
    if version != MANIFEST_VERSION:
        raise ManifestError(f"{where}: version {version} is not supported (expected {MANIFEST_VERSION})")
    latent = _get(raw, "latent", dict, where)
    shape = _get(latent, "shape", list, f"{where} latent")
    if len(shape) != 4 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ManifestError(f"{where}: latent.shape={shape} must be 4 positive integers (frames, C, H, W)")
    dtype = _get(latent, "dtype", str, f"{where} latent")
    if dtype not in LATENT_DTYPES:
        raise ManifestError(f"{where}: latent.dtype={dtype!r} is not one of {LATENT_DTYPES}")
    _get(raw, "vae", dict, where)
    norm = Normalization.from_dict(_get(raw, "normalization", dict, where), shape[1], where)
    actions = _get(raw, "actions", dict, where)
    shards: dict[str, list[ShardEntry]] = {}
    for fmt, block in _get(raw, "formats", dict, where).items():
        if fmt not in FORMATS:
            raise ManifestError(f"{where}: unknown shard format {fmt!r} (expected one of {FORMATS})")
        entries = [ShardEntry(e["path"], int(e["samples"]), int(e["bytes"]), e["sha256"]) for e in block["shards"]]
        paths = [e.path for e in entries]
        if len(set(paths)) != len(paths):
            raise ManifestError(f"{where}: {fmt} lists a shard path twice")
        shards[fmt] = entries
    return Manifest(root=root, raw=raw, frames=shape[0], channels=shape[1], height=shape[2], width=shape[3],
                    dtype=dtype, normalization=norm, has_actions=bool(actions.get("present")),
                    num_action_classes=int(actions.get("num_classes", 0)), shards=shards)


def _no_manifest(root: Location, path: Location, source: str) -> str:
    if not is_remote(root.url):
        return f"{path} does not exist: {source}={root.url!r} must be a directory written by `scd-data encode`"
    found = root.file_sizes()
    what = (f"the prefix holds {len(found)} object(s) but no manifest.json (an encode that has not finished?)"
            if found else "nothing is stored under that prefix")
    return (f"{path} does not exist: {source}={root.url!r} must be a prefix written by "
            f"`scd-data encode --out {root.url}`; {what}")


def latent_crc(latents: np.ndarray) -> str:
    """Per-sample checksum stored in each sample's metadata, so flipped bytes are caught on read."""
    return f"{zlib.crc32(np.ascontiguousarray(latents).tobytes()):08x}"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
