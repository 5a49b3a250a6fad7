"""Shard writers: one encode job's samples to a webdataset tar and/or an MDS directory, atomically.

Each writer fills a temporary name and renames it only when the file is complete and fsynced, so a
killed run leaves either a finished shard or a temporary that the next run deletes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from scd_train.data.manifest import file_sha256

TMP_MARK = ".tmp-"
MDS_SIZE_LIMIT = "256mb"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_record(root: Path, path: Path, samples: int) -> dict:
    return {"path": path.relative_to(root).as_posix(), "samples": samples, "bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


def write_tar(root: Path, final: Path, samples: list[dict]) -> dict:
    """Samples sorted by key, members of a sample contiguous, fixed mtime so reruns give identical bytes."""
    import webdataset as wds

    tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=0) as writer:
        for s in samples:
            item = {"__key__": s["key"], "latents.npy": s["latents"], "json": s["meta"]}
            if s["actions"] is not None:
                item["actions.npy"] = s["actions"]
            writer.write(item)
    _fsync(tmp)
    os.replace(tmp, final)
    return shard_record(root, final, len(samples))


def mds_columns(latent_shape: tuple[int, ...], dtype: str, with_actions: bool) -> dict[str, str]:
    columns = {"key": "str", "latents": f"ndarray:{dtype}:{','.join(map(str, latent_shape))}", "meta": "json"}
    if with_actions:
        columns["actions"] = f"ndarray:int64:{latent_shape[0]}"
    return columns


def write_mds(root: Path, final_dir: Path, samples: list[dict], columns: dict[str, str]) -> list[dict]:
    """One MDS directory (index.json + shard.NNNNN.mds) per job, written by mosaicml-streaming's MDSWriter."""
    from streaming import MDSWriter

    tmp = final_dir.with_name(f"{final_dir.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with MDSWriter(out=str(tmp), columns=columns, size_limit=MDS_SIZE_LIMIT, progress_bar=False) as writer:
        for s in samples:
            row = {"key": s["key"], "latents": s["latents"], "meta": s["meta"]}
            if "actions" in columns:
                row["actions"] = s["actions"]
            writer.write(row)
    for path in tmp.iterdir():
        _fsync(path)
    shutil.rmtree(final_dir, ignore_errors=True)  # a finished directory whose job record was never written
    os.replace(tmp, final_dir)
    index = json.loads((final_dir / "index.json").read_text())
    return [shard_record(root, final_dir / s["raw_data"]["basename"], s["samples"]) for s in index["shards"]]


def remove_temporaries(directory: Path) -> int:
    """Delete what a killed run left half-written; returns how many entries were removed."""
    removed = 0
    if not directory.is_dir():
        return 0
    for path in directory.iterdir():
        if TMP_MARK in path.name:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    return removed


def merge_mds_index(mds_dir: Path, job_dirs: list[Path]) -> None:
    """A top-level index.json over all job directories, so StreamingDataset can read the whole set."""
    from streaming.base.util import merge_index

    staging = mds_dir / f"merged{TMP_MARK}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # merge_index announces its temporary folder with logging.warning(), which would also install a
    # root handler (basicConfig) that duplicates every later log line: silence it for this call only
    root_logger, quiet = logging.getLogger(), logging.NullHandler()
    level = root_logger.level
    root_logger.addHandler(quiet)
    root_logger.setLevel(logging.ERROR)
    try:
        merge_index([str(d / "index.json") for d in job_dirs], str(staging), keep_local=True)
    finally:
        root_logger.setLevel(level)
        root_logger.removeHandler(quiet)
    os.replace(staging / "index.json", mds_dir / "index.json")
    shutil.rmtree(staging)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` under a temporary name, then one rename: a kill never leaves half an array."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def as_float_array(latents, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(latents.numpy().astype(dtype))
