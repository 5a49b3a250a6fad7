"""Sizes and SHA-256 digests of every file of a checkpoint: recorded at save, verified at load.

A checkpoint can be complete (its marker was written) and still be damaged later: a truncated
shard after a full disk, a file lost in a copy, a flipped bit on storage. Loading such a
checkpoint either crashes with a low-level error or, worse, loads silently wrong weights. The
completion marker therefore carries a manifest ``{relative path: {"size", "sha256"}}`` of every
file written before it, and a resume checks the files against it first.

Hashing is spread over the ranks (file ``i`` of the sorted listing is hashed by rank
``i mod world``), so each rank reads about ``1/world`` of the checkpoint; ``scd-sample`` and
``scd-export`` verify everything in one process. ``bench/checkpoint_integrity.py`` measures what
the digests cost next to the save itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

CHUNK = 8 << 20  # bytes read per hashing step: large reads keep hashing near disk / page-cache speed


def file_digest(path: Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def list_files(root: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Paths of every regular file under ``root``, relative to it, sorted, minus ``exclude``."""
    skip = set(exclude)
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in skip:
                found.append(rel)
    return sorted(found)


def digest_files(root: Path, names: Iterable[str]) -> dict[str, dict]:
    """Digests of ``names`` (relative to ``root``); a file that vanished meanwhile is left out."""
    out = {}
    for name in names:
        try:
            out[name] = file_digest(root / name)
        except FileNotFoundError:
            continue
    return out


def share_of(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files rank ``rank`` hashes or checks: every ``world_size``-th one."""
    return names[rank::world_size]


def check_files(root: Path, manifest: dict[str, dict], names: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the files of ``root`` against ``manifest`` (only ``names`` when given), one
    message per damaged file; sizes are compared before anything is hashed."""
    problems = []
    for name in manifest if names is None else names:
        want = manifest[name]
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} were written")
            continue
        if file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{name} has the right size but different contents (SHA-256 mismatch)")
    return problems
