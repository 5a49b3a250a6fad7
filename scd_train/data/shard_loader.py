"""A resumable loader over latent shards (webdataset tar or MDS), the same for both formats.

The order is planned, never discovered: epoch e is the permutation ``default_rng([seed, e])`` of
every sample in the manifest, computed identically on every rank. The tail that would give ranks
unequal batch counts is dropped, the rest is dealt to ranks (sample i to rank i mod world), and
each rank's batches are dealt to its DataLoader workers (batch j to worker j mod workers). Since
the unit of splitting is the sample, not the shard, uneven shards and shards < ranks x workers
cannot starve a rank or make ranks run different numbers of steps.

A rank's stream of batches is a pure function of the batch counter, so the data position is one
integer per rank: resuming rebuilds the workers to start at that batch, and the batches that
follow are the same ones an uninterrupted run would have seen, for any number of workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scd_train.config import ConfigError
from scd_train.data.batch import Batch
from scd_train.data.manifest import Manifest, ManifestError
from scd_train.data.shard_readers import (
    CorruptSampleError,
    TarShardReader,
    check_shard_files,
    corrupt_sample,
    open_shards,
)
from scd_train.errors import ResumeError
from scd_train.storage import CacheSettings, StorageError

log = logging.getLogger(__name__)


class SamplePlan:
    """Which global samples rank ``rank`` reads in each batch; global ids index the manifest's shards in order."""

    def __init__(self, counts: list[int], seed: int, batch_size: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.batches_per_epoch = self.total // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{self.total} samples cannot fill one batch of data.batch_size={batch_size} on each "
                              f"of {world_size} rank(s) (world size detected); lower data.batch_size or encode "
                              "more clips")
        self._rank_order = lru_cache(maxsize=2)(self._compute_rank_order)

    def _compute_rank_order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.total)
        usable = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        return usable[self.rank::self.world_size]

    def rank_order(self, epoch: int) -> np.ndarray:
        return self._rank_order(epoch)

    def position(self, batch_index: int) -> tuple[int, int]:
        """(epoch, first position in this rank's epoch order) of the rank's ``batch_index``-th batch."""
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        return epoch, within * self.batch_size

    def locate(self, global_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, global_id, side="right")) - 1
        return shard, int(global_id - self.offsets[shard])


class _BatchStream(IterableDataset):
    """Endless batches ``start + worker, start + worker + workers, ...`` of one rank.

    Yields (batch, skipped-sample messages), or (None, [error]) when a sample is corrupt in error mode
    or the storage failed to deliver it.
    """

    def __init__(self, loader: ShardLoader, start: int) -> None:
        self.plan, self.readers, self.start = loader.plan, loader.readers, start
        self.manifest, self.frames = loader.manifest, loader.clip_frames
        self.use_actions, self.skip_corrupt = loader.use_actions, loader.on_corrupt == "skip"

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + worker
        while True:
            try:
                yield self.make_batch(index)
            except (CorruptSampleError, StorageError) as exc:
                # handed over as a value: an exception raised inside a worker makes the DataLoader's
                # shutdown wait out its join timeouts (and buries the message under a traceback)
                yield None, [exc]
            index += workers

    def make_batch(self, index: int) -> tuple[Batch, list[str]]:
        epoch, first = self.plan.position(index)
        order = self.plan.rank_order(epoch)
        samples, skips = [], []
        for pos in range(first, first + self.plan.batch_size):
            samples.append(self._read_or_substitute(order, pos, skips))
        latents = torch.from_numpy(np.stack([s.latents[: self.frames] for s in samples]))
        latents = self.manifest.normalization.normalize(latents)
        actions = None
        if self.use_actions:
            actions = torch.from_numpy(np.stack([s.actions[: self.frames] for s in samples]).astype(np.int64))
        return Batch(latents, actions, [s.key for s in samples]), skips

    def _read_or_substitute(self, order: np.ndarray, pos: int, skips: list[str]):
        """The sample at ``pos``; in skip mode a corrupt one is replaced by the next readable one of the
        same epoch order, so the substitution (like everything else) is reproduced on resume."""
        for attempt in range(len(order)):
            shard, local = self.plan.locate(int(order[(pos + attempt) % len(order)]))
            try:
                return self.readers[shard].read(local)
            except CorruptSampleError as exc:
                if not self.skip_corrupt:
                    raise
                skips.append(str(exc))
        raise CorruptSampleError(f"no readable sample left in this rank's epoch order ({len(order)} tried)")


class ShardLoader:
    """Resumable batches of normalized latent clips from the shards listed in a manifest."""

    def __init__(self, manifest: Manifest, fmt: str, *, batch_size: int, seed: int, clip_frames: int,
                 use_actions: bool, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 on_corrupt: str = "error", max_corrupt_skips: int = 0, cache: CacheSettings | None = None) -> None:
        self.manifest, self.fmt = manifest, fmt
        self.batch_size, self.seed, self.clip_frames, self.use_actions = batch_size, seed, clip_frames, use_actions
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.on_corrupt, self.max_corrupt_skips = on_corrupt, max_corrupt_skips
        self.fingerprint = manifest.fingerprint(fmt)
        self._check_files()
        self.readers = open_shards(manifest, fmt, cache)
        self.plan = SamplePlan([r.entry.samples for r in self.readers], seed, batch_size, rank, world_size)
        self.batches_consumed = 0
        self.corrupt_skips = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def _check_files(self) -> None:
        problems = check_shard_files(self.manifest, self.fmt)
        if not problems:
            return
        missing = [p for p, why in problems if why == "missing"]
        if missing:
            raise ManifestError(f"{len(missing)} shard(s) listed in {self.manifest.root}/manifest.json are "
                                    f"missing, first: {missing[0]}")
        path, why = problems[0]
        if self.on_corrupt == "skip":
            for p, w in problems:
                log.warning("shard %s: %s; its unreadable samples will be skipped", p, w)
            return
        member = ""
        if self.fmt == "webdataset":
            entry = next(e for e in self.manifest.shards_for(self.fmt) if self.manifest.root / e.path == path)
            member = f"; {TarShardReader(self.manifest, entry).damage_report()}"
        raise corrupt_sample(str(path), "(file size)", f"{why}{member}")

    def _batches(self) -> Iterator[tuple[Batch, list[str]]]:
        stream = _BatchStream(self, self.batches_consumed)
        if self.num_workers == 0:
            return iter(stream)
        # a generator of its own: otherwise starting the workers draws their base seed from the global
        # RNG, shifting the training noise by one draw per (re)start, and a resumed run would differ
        # from an uninterrupted one (the batches themselves need no randomness)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                            persistent_workers=False, pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch, skips in self._batches():
            if batch is None:
                error = skips[0]
                error.rank_local = True  # only this rank read that sample: it reports the failure itself
                raise error
            for message in skips:
                self.corrupt_skips += 1
                if self.corrupt_skips > self.max_corrupt_skips:
                    raise CorruptSampleError(f"more than data.max_corrupt_skips={self.max_corrupt_skips} corrupt "
                                             f"samples; the last: {message}")
                log.warning("skipped corrupt sample (%d of at most %d): %s", self.corrupt_skips,
                            self.max_corrupt_skips, message)
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict:
        epoch, first = self.plan.position(self.batches_consumed)
        return {"kind": "shards", "format": self.fmt, "fingerprint": self.fingerprint, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "batches_consumed": self.batches_consumed, "corrupt_skips": self.corrupt_skips,
                "epoch": epoch, "batch_in_epoch": first // self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "shards":
            raise ResumeError("the checkpoint's data position is not from a shard loader (data.source changed?)")
        for key in ("format", "fingerprint", "seed", "world_size", "batch_size"):
            mine = getattr(self, "fmt" if key == "format" else key)
            if state[key] != mine:
                raise ResumeError(f"data position saved with {key}={state[key]!r} cannot resume with {key}={mine!r}")
        self.batches_consumed = int(state["batches_consumed"])
        self.corrupt_skips = int(state["corrupt_skips"])
