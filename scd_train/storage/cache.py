"""The node-local cache directory of a remote shard set: claimed, cleaned and sized before use.

Layout: ``<cache_dir>/<name of the URL>-<fingerprint>/``, one entry per version of a shard set, so
a set re-encoded at the same URL never reads stale shards. Before a run uses an entry, the first
process of the node (LOCAL_RANK 0) claims it with an exclusive ``flock``; no running job can then
hold it, so whatever it finds is a leftover of a run that died:

* entries of an older version of the same URL are deleted;
* half-downloaded files, and files whose size disagrees with the manifest, are deleted;
* shared memory that mosaicml-streaming registered for this directory (it leaks when a run is
  killed, and the next run then fails with ``FileExistsError`` or "Reused local directory") is
  unlinked, together with its lock files; streaming memory of other directories is left alone,
  unlike ``streaming.base.util.clean_stale_shared_memory()``, which unlinks every job's.

It then checks that the disk is writable and has room for what the run may download (the whole
set, or ``data.cache_limit``), and turns the claim into a shared lock that every process of the
run holds until it exits. A second job on the same node and entry is refused with a clear message.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scd_train.storage.errors import BadCacheDir

log = logging.getLogger("scd_train.storage")

LOCK_NAME = ".in-use.lock"
SHM_ROOT = Path("/dev/shm")
# streaming refuses a cache limit below 4 shards (raw + compressed forms)
MIN_SHARDS_IN_CACHE = 4


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"scd-train-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def parse_size(text: str | int | None, key: str = "data.cache_limit") -> int | None:
    """Bytes from ``"20gb"``, ``"512mb"``, ``"1.5tb"`` or a plain number; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if match is None:
        raise ValueError(f"{key}={text!r}: expected a size such as 500mb, 20gb or 1.5tb")
    number, unit = float(match.group(1)), (match.group(2) or "b").rstrip("b").rstrip("i") or "b"
    scale = {"b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}[unit]
    return int(number * scale)


def entry_name(url: str, fingerprint: str) -> str:
    """``<readable tail of the URL>_<hash of the URL>-<fingerprint>``: everything before the last "-" names
    the URL, so the entries of older versions of one URL are exactly those sharing that stem."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-64:]
    return f"{slug}_{hashlib.sha256(url.encode()).hexdigest()[:8]}-{fingerprint[:16]}"


@dataclass(frozen=True)
class CacheSettings:
    """Where remote shards are cached on each node, and how many bytes they may take there."""

    directory: str | None = None  # None: default_cache_dir()
    limit_bytes: int | None = None  # None: no limit (the whole set may be cached)

    @property
    def root(self) -> Path:
        return Path(self.directory) if self.directory else default_cache_dir()


class CacheEntry:
    """One shard set's cache directory on this node, held by this process while it runs."""

    def __init__(self, settings: CacheSettings, url: str, fingerprint: str, expected: dict[str, int],
                 local_leader: bool) -> None:
        """``expected``: every file the set may put here (relative name -> bytes)."""
        self.settings, self.url, self.expected = settings, url, expected
        self.path = settings.root / entry_name(url, fingerprint)
        self._lock_fd: int | None = None
        self.check_limit(max((v for v in expected.values() if v >= 0), default=0))
        if local_leader:
            self._claim_and_clean()

    @property
    def where(self) -> str:
        return f"data.cache_dir={self.settings.directory or str(self.settings.root)!r}"

    def check_limit(self, largest_shard: int) -> None:
        limit = self.settings.limit_bytes
        if limit is not None and limit < MIN_SHARDS_IN_CACHE * largest_shard:
            raise BadCacheDir(f"data.cache_limit={limit} bytes is below {MIN_SHARDS_IN_CACHE}x the largest shard of "
                              f"{self.url} ({largest_shard} bytes); raise it to at least "
                              f"{MIN_SHARDS_IN_CACHE * largest_shard} bytes")

    # -- the local leader's claim -------------------------------------------------------------------
    def _claim_and_clean(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise BadCacheDir(f"{self.where} cannot be used for {self.url}: {exc.strerror} ({self.path}); point "
                              "data.cache_dir at a writable local disk") from None
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadCacheDir(f"{self.where}: the cache {self.path} is in use by another running job on this node; "
                              "give concurrent runs different data.cache_dir values") from None
        try:
            self._remove_older_versions()
            self._remove_leftovers()
            removed = remove_stale_shared_memory(self.path)
            if removed:
                log.warning("removed %d shared-memory segment(s) a killed run left for %s", removed, self.path)
            self._check_free_space()
        except BaseException:
            os.close(fd)  # a refused start must not keep the cache claimed (or its disk busy)
            raise
        self._lock_fd = fd
        fcntl.flock(fd, fcntl.LOCK_SH)  # from now on every process of this run shares the claim

    def close(self) -> None:
        """Give up this process's claim (also when the object is collected, and at exit)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:
        self.close()

    def hold(self) -> None:
        """Called by the other processes of the node once the leader has claimed the entry."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd

    def _remove_older_versions(self) -> None:
        stem = self.path.name.rsplit("-", 1)[0]
        for other in self.settings.root.glob(f"{stem}-*"):
            if other == self.path or not other.is_dir() or other.name.rsplit("-", 1)[0] != stem:
                continue
            fd = os.open(other / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running job still reads that version
            finally:
                os.close(fd)
            size = sum(p.stat().st_size for p in other.rglob("*") if p.is_file())
            shutil.rmtree(other, ignore_errors=True)
            remove_stale_shared_memory(other)
            log.warning("removed the cache of an older version of %s (%s, %.1f MB)", self.url, other, size / 1e6)

    def _remove_leftovers(self) -> None:
        for path in list(self.path.rglob("*")):
            if not path.is_file() or path.name == LOCK_NAME:
                continue
            rel = path.relative_to(self.path).as_posix()
            want = self.expected.get(rel)
            size = path.stat().st_size
            if want is None or (want >= 0 and size != want):
                path.unlink()
                log.warning("removed %s from the cache: %s", path,
                            "not part of the shard set (a half-finished download?)" if want is None else
                            f"{size} bytes, the manifest records {want}")

    def cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and p.name != LOCK_NAME)

    def _check_free_space(self) -> None:
        total = sum(max(v, 0) for v in self.expected.values())
        limit = self.settings.limit_bytes
        needed = max(0, (total if limit is None else min(limit, total)) - self.cached_bytes())
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise BadCacheDir(f"{self.where} ({self.path}) has {free / 1e6:.1f} MB free but caching {self.url} needs "
                              f"up to {needed / 1e6:.1f} MB more (data.cache_limit="
                              f"{'unlimited' if limit is None else limit}); free space, move data.cache_dir to a "
                              "larger local disk, or set data.cache_limit below the free space")


def remove_stale_shared_memory(local_dir: Path) -> int:
    """Unlink the shared memory and lock files streaming registered for ``local_dir`` and its
    sub-directories. Only safe while holding the directory's exclusive claim: then no live run uses it."""
    if not SHM_ROOT.is_dir():
        return 0
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN

    # streaming names its memory "<6-digit prefix>_<name>" and records the local dirs of a prefix in
    # "<prefix>_locals" (int32 byte count, then the dirs and the prefix, NUL-separated)
    root = os.path.abspath(local_dir)
    removed = 0
    for locals_file in SHM_ROOT.glob(f"[0-9][0-9][0-9][0-9][0-9][0-9]_{LOCALS}"):
        prefix = locals_file.name.split("_", 1)[0]
        try:
            data = locals_file.read_bytes()
        except OSError:
            continue
        size = int.from_bytes(data[:4], "little", signed=True)
        dirs = data[4:size].decode("utf-8", "replace").split("\0")[:-1]
        if not any(d == root or d.startswith(root + os.sep) for d in dirs):
            continue
        for name in SHM_TO_CLEAN:
            shm = SHM_ROOT / f"{prefix}_{name}"
            if shm.exists():
                shm.unlink(missing_ok=True)
                removed += 1
        for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
            (Path(tempfile.gettempdir()) / f"{prefix}_{name}").unlink(missing_ok=True)
    return removed


def node_barrier() -> None:
    """All ranks wait here (the leader's claim must precede everyone else's use)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def fingerprint_of(paths_and_sizes: dict[str, int]) -> str:
    return hashlib.sha256("\n".join(f"{k}:{v}" for k, v in sorted(paths_and_sizes.items())).encode()).hexdigest()
