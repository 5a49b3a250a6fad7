"""Where ``scd-data encode`` puts finished files: the output directory itself, or a bucket.

With a local ``--out`` every file is written in place (under a temporary name, then renamed), as it
always was, and nothing here does anything. With an ``s3://`` ``--out`` the files of a job are
written into a local staging directory first; once a job is complete its shards are uploaded, then
its record (the completion mark), and the staged shard bytes are dropped. Each upload is one PUT or
a multipart upload, which S3 shows only once complete, so a killed encode never leaves a
half-written object, and a rerun finds in the bucket exactly the jobs that finished.
"""

from __future__ import annotations

from pathlib import Path

from scd_train.storage import Location


def in_place(dest: Location, work_dir: Path) -> bool:
    return not dest.is_remote and Path(dest.url).resolve() == Path(work_dir).resolve()


def publish(dest: Location, work_dir: Path, rels: list[str], drop: bool = False) -> None:
    """Make the finished files ``rels`` (relative to ``work_dir``) visible under ``dest``, in order."""
    if in_place(dest, work_dir):
        return
    for rel in rels:
        (dest / rel).upload_from(work_dir / rel)
        if drop:
            (work_dir / rel).unlink()


def fetch(dest: Location, work_dir: Path, rels: list[str]) -> None:
    """Bring small files of earlier runs (an MDS job's index.json) into the staging directory."""
    if in_place(dest, work_dir):
        return
    for rel in rels:
        if not (work_dir / rel).is_file():
            (dest / rel).download_to(work_dir / rel)
