"""``scd-data verify``: every shard against the manifest (size, sha256, sample count, tar layout,
per-job MDS index), every sample against the latent contract (fields, shape, dtype, finite values,
per-sample checksum, value bounds, integer actions), and the statistics of all stored latents
against the manifest's ``latent_stats``."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from scd_train.data.latent_checks import StatsAccumulator, statistics_mismatch
from scd_train.data.manifest import ManifestError, load_manifest
from scd_train.data.shard_readers import CorruptSampleError, open_shards
from scd_train.storage import CacheSettings, RetryPolicy


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: Path | str, formats: list[str] | None = None, progress: bool = True,
           retry: RetryPolicy | None = None) -> VerifyReport:
    """``root``: a shard directory or an s3:// prefix (MDS shards of a bucket pass through a scratch cache)."""
    manifest = load_manifest(root, "the shard directory", retry=retry)
    report = VerifyReport()
    with tempfile.TemporaryDirectory(prefix="scd-verify-") as scratch:
        for fmt in formats or sorted(manifest.shards):
            _verify_format(manifest, fmt, report, progress, CacheSettings(scratch))
    return report


def _verify_format(manifest, fmt: str, report: VerifyReport, progress: bool, cache: CacheSettings) -> None:
    entries = manifest.shards_for(fmt)
    sizes = manifest.root.file_sizes([e.path for e in entries])
    intact = []
    for entry in entries:
        path = manifest.root / entry.path
        report.shards += 1
        if entry.path not in sizes:
            report.problems.append(f"{fmt} shard {path}: missing")
        elif sizes[entry.path] != entry.bytes:
            report.problems.append(f"{fmt} shard {path}: {sizes[entry.path]} bytes, manifest says {entry.bytes}")
        elif path.sha256() != entry.sha256:
            report.problems.append(f"{fmt} shard {path}: sha256 differs from the manifest")
        else:
            intact.append(entry.path)
    if fmt == "mds":
        _verify_mds_index(manifest, entries, report)
    keys: dict[str, str] = {}
    read, stats = 0, StatsAccumulator()
    readers = []
    if not any("missing" in p for p in report.problems):
        try:
            readers = open_shards(manifest, fmt, cache)
        except ManifestError as exc:  # e.g. a per-job MDS index that disagrees with the manifest
            report.problems.append(str(exc))
    total = sum(len(r) for r in readers)
    with tqdm(total=total, desc=f"verify {fmt}", unit="sample", disable=not progress, file=sys.stderr) as bar:
        for reader in readers:
            for i in range(len(reader)):
                try:
                    sample = reader.read(i)
                except CorruptSampleError as exc:
                    report.problems.append(str(exc))
                    bar.update(len(reader) - i)
                    break
                if sample.key in keys:
                    report.problems.append(f"sample key {sample.key} appears in {keys[sample.key]} and {reader.path}")
                keys[sample.key] = str(reader.path)
                stats.add(sample.latents)
                read += 1
                bar.update()
    report.samples += read
    expected = sum(e.samples for e in entries)
    if readers and read < expected and not report.problems:
        report.problems.append(f"{fmt}: read {read} samples, manifest says {expected}")
    if readers and read == expected and (mismatch := statistics_mismatch(stats, manifest)) is not None:
        report.problems.append(f"{fmt}: {mismatch}")


def _verify_mds_index(manifest, entries, report: VerifyReport) -> None:
    index_path = manifest.root / "mds" / "index.json"
    if not index_path.exists():
        report.problems.append(f"MDS index {index_path} is missing (StreamingDataset needs it)")
        return
    listed = {f"mds/{s['raw_data']['basename']}" for s in json.loads(index_path.read_text())["shards"]}
    missing = [e.path for e in entries if e.path not in listed]
    if missing:
        report.problems.append(f"{index_path} does not list {len(missing)} shard(s), first: {missing[0]}")
