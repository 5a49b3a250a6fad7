"""MDS samples by (shard, position), wherever the shards live.

A local directory is read in place with mosaicml-streaming's own shard readers: no cache, no shared
memory. A bucket is read through streaming's ``StreamingDataset`` (its remote, local cache and cache
limit): a shard is downloaded on first use into the node's cache entry (see ``cache.py``), shared by
every rank and DataLoader worker of the node, and the least recently used shards are evicted beyond
``data.cache_limit``. Only its random access (``get_item``) is used: the order, the split across ranks
and the resume position stay ours, the same as for local shards.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Protocol

from scd_train.storage.cache import CacheEntry, CacheSettings, is_local_leader, node_barrier
from scd_train.storage.errors import BadCacheDir, MissingObject, StorageError
from scd_train.storage.location import Location, translate
from scd_train.storage.retry import RetryPolicy

log = logging.getLogger("scd_train.storage")

DOWNLOAD_TIMEOUT_S = 300.0


class MdsShards(Protocol):
    def get(self, shard_path: str, index: int) -> dict[str, Any]:
        """Columns of sample ``index`` of the shard at ``shard_path`` (relative to the set's root)."""


class LocalMdsShards:
    """Shards in a local directory, read in place."""

    def __init__(self, root: Location, index_objects: dict[str, dict]) -> None:
        from streaming.base.format import reader_from_json

        base = root.local_path()
        # index.json basenames are relative to the directory holding index.json
        self._readers = {rel: reader_from_json(str((base / rel).parent), None, obj)
                         for rel, obj in index_objects.items()}

    def get(self, shard_path: str, index: int) -> dict[str, Any]:
        return self._readers[shard_path].get_item(index)


def _logged_stream_class():
    from streaming import Stream

    class LoggedStream(Stream):
        """streaming's Stream whose downloads go through our retry policy: bounded, logged, and
        failures that name the object and what to do."""

        retry_policy: RetryPolicy = RetryPolicy()

        def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
            remote = f"{self.remote.rstrip('/')}/{from_basename}"
            local = os.path.join(self.local, self.split, to_basename or from_basename)

            def download() -> None:
                self._downloader.download(remote, local, self.download_timeout)

            try:
                self.retry_policy.call(download, what=f"download {remote}", on_retry=self._downloader.clean_up)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise BadCacheDir(f"the cache directory ran out of space downloading {remote} to {local}; free "
                                      "space or lower data.cache_limit") from None
                raise _download_error(exc, remote) from None
            except Exception as exc:
                raise _download_error(exc, remote) from None
            return local

    return LoggedStream


def _download_error(exc: BaseException, remote: str) -> StorageError:
    err = translate(exc, remote, "download")
    if isinstance(err, MissingObject):
        return MissingObject(f"{remote} is gone: the manifest lists it but the bucket no longer has it (deleted "
                             "or moved after encoding?); restore the object or re-encode the set, then resume")
    return err


class RemoteMdsShards:
    """Shards in a bucket, through StreamingDataset with a node-local cache."""

    def __init__(self, root: Location, shard_sizes: dict[str, int], fingerprint: str,
                 cache: CacheSettings) -> None:
        from streaming import StreamingDataset

        mds = root / "mds"
        expected = dict(shard_sizes)
        expected["mds/index.json"] = -1  # size unknown until downloaded
        leader = is_local_leader()
        self.entry = CacheEntry(cache, str(root), fingerprint, expected, leader)
        node_barrier()  # the leader has claimed and cleaned the entry
        self.entry.hold()
        stream_cls = _logged_stream_class()
        stream = stream_cls(remote=mds.url, local=str(self.entry.path / "mds"), download_retry=1,
                            download_timeout=DOWNLOAD_TIMEOUT_S)
        stream.retry_policy = root.retry
        try:
            self._dataset = StreamingDataset(streams=[stream], cache_limit=cache.limit_bytes, batch_size=1,
                                             shuffle=False)
        except StorageError:
            raise
        except ValueError as exc:  # streaming's own checks, e.g. a cache limit it finds too small
            raise BadCacheDir(f"data.cache_dir / data.cache_limit for {root}: {exc}") from None
        offsets = {}
        for shard_id, (shard, start) in enumerate(zip(self._dataset.shards, self._dataset.sample_offset_per_shard)):
            basename = shard.file_pairs[0][0].basename
            offsets[f"mds/{basename}"] = (shard_id, int(start))
        missing = [p for p in shard_sizes if p not in offsets]
        if missing:
            raise MissingObject(f"{mds}/index.json does not list {len(missing)} shard(s) of the manifest, first: "
                                f"{missing[0]}; re-encode the set")
        self._offsets = offsets
        log.info("MDS shards of %s are cached in %s (limit %s)", root, self.entry.path,
                 "none" if cache.limit_bytes is None else f"{cache.limit_bytes} bytes")

    def get(self, shard_path: str, index: int) -> dict[str, Any]:
        shard_id, start = self._offsets[shard_path]
        try:
            return self._dataset.get_item(start + index)
        except Exception:
            self._release(shard_id)
            raise

    def _release(self, shard_id: int) -> None:
        """After a failed download streaming leaves the shard marked "being prepared", and every other
        process of the node would wait for it forever; mark it missing so they try (and fail) themselves."""
        from streaming.base.dataset import _ShardState

        states = self._dataset._shard_states  # noqa: SLF001  (no public way to undo a failed prepare)
        if states[shard_id] == _ShardState.PREPARING:
            states[shard_id] = _ShardState.REMOTE


def open_mds(root: Location, index_objects: dict[str, dict], fingerprint: str,
             cache: CacheSettings | None = None) -> MdsShards:
    """Sample access for the MDS shards of a set: ``index_objects`` maps each shard's relative path (in
    manifest order) to its entry in its job's index.json, already checked against the manifest."""
    if root.is_remote:
        sizes = {rel: int(obj["raw_data"]["bytes"]) for rel, obj in index_objects.items()}
        return RemoteMdsShards(root, sizes, fingerprint, cache or CacheSettings())
    return LocalMdsShards(root, index_objects)
