"""The run directory contract: one run per directory, never two mixed.

* **One writer at a time.** Rank 0 holds an exclusive lock on ``<run_dir>/run.lock`` for as long as
  the run lives. A second run in the same directory (a requeued job while the old job's ranks are
  still saving, launcher workers orphaned by a killed launcher, or a plain mistake) waits up to
  ``train.run_dir_lock_wait_s`` for it, naming the holder, then stops.
* **A fresh start never lands in a used directory.** ``train.resume=false`` where a run has already
  left checkpoints or metrics is refused with what is there; ``train.on_used_run_dir=archive``
  moves the old run under ``archive/<time>/`` first, ``=overwrite`` deletes it.
* **A resume continues exactly one history.** Metrics records logged after the checkpoint a run
  resumes from (a hard kill leaves them behind) move to ``metrics.discarded.jsonl``, so
  ``metrics.jsonl`` holds every step at most once; each resume appends what it resumed from, which
  damaged checkpoints it skipped and which settings changed to ``resumes.jsonl``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from scd_train.checkpoint import atomic_write_text, step_of
from scd_train.errors import InputError

log = logging.getLogger(__name__)

LOCK = "run.lock"
ARCHIVE = "archive"
METRICS = "metrics.jsonl"
DISCARDED_METRICS = "metrics.discarded.jsonl"
RESUMES = "resumes.jsonl"
# Entries that stay where they are when a directory is archived or overwritten: the lock, earlier
# archives, and the scheduler's own folder (submitit keeps the live job's logs and pickles there).
KEPT_IN_PLACE = (LOCK, ARCHIVE, "slurm")
LOCK_POLL_S = 1.0
LOCK_REPORT_EVERY_S = 15.0


class RunDirectoryError(InputError):
    """The run directory holds another run (or is in use by one) and this run would mix with it."""


# Locks this process holds, by resolved directory: a second Trainer in the same process (a test, a
# notebook) takes the lock over instead of waiting for itself.
_HELD: dict[str, RunDirLock] = {}


@dataclass
class RunDirLock:
    path: Path
    handle: object = None

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
        _HELD.pop(str(self.path.parent.resolve()), None)


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return (f"pid {holder.get('pid')} on host {holder.get('host')} (job {holder.get('job') or '-'}, "
                f"since {holder.get('since')})")
    except (OSError, ValueError):
        return "another process"


def acquire_lock(run_dir: Path, wait_s: float) -> RunDirLock | None:
    """An exclusive lock on ``run_dir``, waiting up to ``wait_s`` for its holder; None where the file
    system has no locks (a warning says so)."""
    key = str(run_dir.resolve())
    if key in _HELD:
        return _HELD[key]
    path = run_dir / LOCK
    handle = open(path, "a+")
    start = time.monotonic()
    reported = 0.0
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited >= wait_s:
                handle.close()
                raise RunDirectoryError(
                    f"run directory {run_dir} is in use by {_holder_text(path)}; waited {wait_s:.0f} s "
                    "(train.run_dir_lock_wait_s) for it to end. Stop that run, or choose another train.run_dir"
                ) from None
            if waited - reported >= LOCK_REPORT_EVERY_S or reported == 0.0:
                log.warning("run directory %s is in use by %s: waiting up to %.0f s for it to end (%.0f s so far)",
                            run_dir, _holder_text(path), wait_s, waited)
                reported = max(waited, 1e-9)
            time.sleep(LOCK_POLL_S)
        except OSError as exc:  # e.g. ENOLCK on a network file system without a lock service
            handle.close()
            log.warning("cannot lock run directory %s (%s): nothing stops a second run from writing into it",
                        run_dir, exc)
            return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID"),
                             "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    handle.flush()
    lock = RunDirLock(path, handle)
    _HELD[key] = lock
    return lock


@dataclass
class Contents:
    """What an earlier run left in a directory."""

    checkpoints: list[str] = field(default_factory=list)
    metrics_records: int = 0
    metrics_steps: tuple[int, int] | None = None

    @property
    def used(self) -> bool:
        return bool(self.checkpoints or self.metrics_records)

    def describe(self) -> str:
        parts = []
        if self.checkpoints:
            steps = sorted({step_of(Path(c)) for c in self.checkpoints})
            names = ", ".join(self.checkpoints[:4]) + (", ..." if len(self.checkpoints) > 4 else "")
            parts.append(f"{len(self.checkpoints)} checkpoint(s) up to step {steps[-1]} ({names})")
        if self.metrics_records:
            first, last = self.metrics_steps or (None, None)
            parts.append(f"{METRICS} with {self.metrics_records} record(s) of steps {first}..{last}")
        return " and ".join(parts)


def read_records(path: Path) -> tuple[list[dict], int]:
    """The parsable records of a JSON-lines file, and how many lines were not (a kill mid-write)."""
    records, broken = [], 0
    if not path.is_file():
        return records, broken
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            broken += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            broken += 1
    return records, broken


def inspect(run_dir: Path) -> Contents:
    contents = Contents()
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        contents.checkpoints = sorted(p.name for p in checkpoints.glob("step_*") if p.is_dir())
    records, _ = read_records(run_dir / METRICS)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    contents.metrics_records = len(records)
    contents.metrics_steps = (min(steps), max(steps)) if steps else None
    return contents


def prepare_fresh_start(run_dir: Path, policy: str) -> Path | None:
    """Make ``run_dir`` fit for a run from step 0 (``train.resume=false``): refuse a used directory,
    or archive / delete what the earlier run left (``policy``). Returns the archive folder, if any."""
    contents = inspect(run_dir)
    if not contents.used:
        return None
    if policy == "refuse":
        raise RunDirectoryError(
            f"train.resume=false but run directory {run_dir} already holds a run: {contents.describe()}. "
            "A fresh start would mix with it. Resume it (train.resume=true), choose another train.run_dir, or set "
            f"train.on_used_run_dir=archive (moves the old run to {run_dir / ARCHIVE}/<time>/) or "
            "train.on_used_run_dir=overwrite (deletes it)")
    entries = [p for p in run_dir.iterdir() if p.name not in KEPT_IN_PLACE]
    if policy == "overwrite":
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        log.warning("train.on_used_run_dir=overwrite: deleted the earlier run in %s (%s)", run_dir, contents.describe())
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir / ARCHIVE / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = run_dir / ARCHIVE / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for entry in entries:
        os.rename(entry, target / entry.name)
    log.warning("train.on_used_run_dir=archive: moved the earlier run in %s (%s) to %s", run_dir, contents.describe(),
                target)
    return target


def discard_records_after(run_dir: Path, step: int) -> int:
    """Keep in ``metrics.jsonl`` only records of steps <= ``step`` (the checkpoint being resumed) and
    move the rest, marked, to ``metrics.discarded.jsonl``; returns how many were moved. Unparsable
    lines (a kill mid-write) are dropped too."""
    path = run_dir / METRICS
    records, broken = read_records(path)
    kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
    dropped = [r for r in records if isinstance(r.get("step"), int) and r["step"] > step]
    if not dropped and not broken:
        return 0
    if dropped:
        with open(run_dir / DISCARDED_METRICS, "a") as f:
            for record in dropped:
                f.write(json.dumps({**record, "discarded_on_resume_from_step": step}) + "\n")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    log.warning("%s: %d record(s) of steps after %d came from training that the resume from step %d repeats; moved "
                "to %s%s", path, len(dropped), step, step, DISCARDED_METRICS,
                f" ({broken} unreadable line(s) dropped)" if broken else "")
    return len(dropped)


def append_resume_record(run_dir: Path, record: dict) -> None:
    with open(run_dir / RESUMES, "a") as f:
        f.write(json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"), **record}) + "\n")
