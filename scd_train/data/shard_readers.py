"""Random access to the samples of one shard, for both formats, with failures that name shard and member.

A webdataset shard is a plain tar whose members ``<key>.latents.npy``, ``<key>.actions.npy`` and
``<key>.json`` are grouped by key; it is indexed once (header scan) and then read by offset. An MDS
shard is read with mosaicml-streaming's own shard reader. Every sample is checked on read: fields
present, shape, dtype, finite values and the per-sample checksum written at encode time.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np

from scd_train.data.latent_checks import sample_problem
from scd_train.data.manifest import Manifest, ManifestError, ShardEntry, latent_crc
from scd_train.errors import InputError
from scd_train.storage import CacheSettings, Location, MdsShards, MissingObject, StorageError, open_mds

LATENTS, ACTIONS, META = "latents.npy", "actions.npy", "json"


class CorruptSampleError(InputError):
    """A sample could not be read intact; the message names the shard and the member (or sample) at fault.

    A one-argument constructor keeps the type when a DataLoader worker re-raises it in the main process.
    Only the rank that read the sample sees it, so that rank reports it.
    """

    rank_local = True


def corrupt_sample(shard: str, member: str, reason: str) -> CorruptSampleError:
    return CorruptSampleError(f"corrupt data in shard {shard}, member {member}: {reason}")


class _LayoutFault(ValueError):
    """The tar's members do not group into the samples the manifest describes."""


@dataclass
class Sample:
    key: str
    latents: np.ndarray  # (frames, C, H, W) raw VAE latents
    actions: np.ndarray | None  # (frames,) int64
    meta: dict


class ShardReader:
    """Shared checks; subclasses fetch the fields of sample ``index`` (its position in the shard)."""

    def __init__(self, manifest: Manifest, entry: ShardEntry) -> None:
        self.manifest, self.entry = manifest, entry
        self.path: Location = manifest.root / entry.path

    def __len__(self) -> int:
        return self.entry.samples

    def read(self, index: int) -> Sample:
        if not 0 <= index < self.entry.samples:
            raise IndexError(f"sample {index} outside shard {self.path} of {self.entry.samples} samples")
        sample, member = self._fetch(index)
        self._check(sample, member)
        return sample

    def _fetch(self, index: int) -> tuple[Sample, str]:
        raise NotImplementedError

    def _fail(self, member: str, reason: str) -> CorruptSampleError:
        return corrupt_sample(str(self.path), member, reason)

    def _check(self, sample: Sample, member: str) -> None:
        m = self.manifest
        lat = sample.latents
        if not isinstance(lat, np.ndarray) or lat.dtype != np.dtype(m.dtype):
            raise self._fail(member, f"latents dtype {getattr(lat, 'dtype', type(lat))} but the manifest says "
                                     f"{m.dtype}")
        if tuple(lat.shape) != m.latent_shape:
            raise self._fail(member, f"latents shape {tuple(lat.shape)} but the manifest says {m.latent_shape}")
        expected_crc = sample.meta.get("latents_crc32")
        if expected_crc is not None and latent_crc(lat) != expected_crc:
            raise self._fail(member, f"latents checksum {latent_crc(lat)} != {expected_crc} recorded at encode time")
        # one min/max per channel finds NaN/Inf and values beyond the bounds the manifest implies
        if (problem := sample_problem(lat, m.normalization)) is not None:
            raise self._fail(member, problem)
        if m.has_actions:
            act = sample.actions
            if act is None:
                raise self._fail(member, "actions are missing but the manifest says every sample has them")
            if not isinstance(act, np.ndarray) or not np.issubdtype(act.dtype, np.integer):
                raise self._fail(member, f"actions dtype {getattr(act, 'dtype', type(act))}: action ids must be "
                                         "integers (float ids would be truncated)")
            if act.shape != (m.frames,):
                raise self._fail(member, f"actions shape {act.shape} != ({m.frames},) latent frames")
            if act.size and (act.min() < 0 or act.max() >= m.num_action_classes):
                raise self._fail(member, f"action ids span [{act.min()}, {act.max()}] but the manifest's "
                                         f"{m.num_action_classes} classes allow [0, {m.num_action_classes - 1}]")


class TarShardReader(ShardReader):
    """Reads members by offset after one scan of the tar headers."""

    def __init__(self, manifest: Manifest, entry: ShardEntry) -> None:
        super().__init__(manifest, entry)
        self._samples: list[tuple[str, dict[str, tarfile.TarInfo]]] | None = None
        self._broken: tuple[str, str] | None = None  # (member, reason) where the scan stopped
        # a layout that disagrees with the manifest or with webdataset's grouping (duplicate, scattered or
        # extra samples): webdataset's own reader would yield other samples than ours, so none is served
        self._layout_fault: tuple[str, str] | None = None
        self.last_member: str | None = None  # the last member the scan read completely

    def _scan(self) -> None:
        samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        size = self.path.size()
        member, key, seen = "(start of file)", None, set()
        try:
            # on a bucket, the header scan reads ahead in large blocks: a few GETs per shard
            with self.path.open_read() as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    member, base = info.name, info.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        raise _LayoutFault(f"member name {info.name!r} has no '<key>.<field>' form")
                    key, field = base.split(".", 1)
                    if info.offset_data + info.size > size:
                        raise ValueError(f"member ends at byte {info.offset_data + info.size} but the file has "
                                         f"{size} bytes (truncated)")
                    if samples and samples[-1][0] == key:
                        if field in samples[-1][1]:
                            raise _LayoutFault(f"duplicate member {info.name!r} (sample {key!r} stored twice)")
                        samples[-1][1][field] = info
                    elif key in seen:
                        raise _LayoutFault(f"members of sample {key!r} are not contiguous: {info.name!r} follows "
                                           f"{self.last_member!r} of another sample (a duplicated or scattered "
                                           "sample; webdataset would yield it twice)")
                    else:
                        samples.append((key, {field: info}))
                        seen.add(key)
                    self.last_member = member
        except _LayoutFault as exc:
            self._layout_fault = (member, str(exc))
        except StorageError:
            raise  # the store failed, not the shard: never mistake it for damage
        except (tarfile.TarError, ValueError, OSError) as exc:
            self._broken = (member, str(exc))
            if samples and samples[-1][0] == key:  # the sample being read when the fault hit is incomplete
                samples.pop()
        if self._layout_fault is None and self._broken is None and len(samples) > self.entry.samples:
            extra = samples[self.entry.samples][0]
            self._layout_fault = (f"{extra}.*", f"the tar holds {len(samples)} samples but the manifest says "
                                                f"{self.entry.samples} (webdataset would also yield the extra ones)")
        self._samples = samples

    def damage_report(self) -> str:
        """Where the damage starts, for messages: the first bad member, or the last good one."""
        if self._samples is None:
            self._scan()
        if self._layout_fault is not None:
            return f"malformed at member: {self._layout_fault[0]} ({self._layout_fault[1]})"
        if self._broken is not None:
            return f"first damaged member: {self._broken[0]} ({self._broken[1]})"
        return (f"readable up to member: {self.last_member} ({len(self._samples)} of {self.entry.samples} "
                "samples complete)")

    def _fetch(self, index: int) -> tuple[Sample, str]:
        if self._samples is None:
            self._scan()
        if self._layout_fault is not None:
            raise self._fail(self._layout_fault[0], self._layout_fault[1])
        if index >= len(self._samples):
            if self._broken is not None:
                member, reason = self._broken
                raise self._fail(f"sample {index} (after {member})", f"shard unreadable from there on: {reason}")
            raise self._fail(f"sample {index}", f"the tar holds {len(self._samples)} samples but the manifest says "
                                                f"{self.entry.samples}")
        key, fields = self._samples[index]
        member = f"{key}.{LATENTS}"
        if LATENTS not in fields or META not in fields:
            missing = [x for x in (LATENTS, META) if x not in fields]
            raise self._fail(member, f"ValueError: missing member(s) {', '.join(key + '.' + m for m in missing)}")
        # a sample's members are contiguous: one read (one ranged GET on a bucket) fetches them all
        start = min(info.offset_data for info in fields.values())
        blob = self.path.read_range(start, max(info.offset_data + info.size for info in fields.values()))
        try:
            def member_bytes(field: str) -> bytes:
                info = fields[field]
                return blob[info.offset_data - start: info.offset_data - start + info.size]

            latents = np.load(io.BytesIO(member_bytes(LATENTS)), allow_pickle=False)
            member = f"{key}.{META}"
            meta = json.loads(member_bytes(META))
            actions = None
            if ACTIONS in fields:
                member = f"{key}.{ACTIONS}"
                actions = np.load(io.BytesIO(member_bytes(ACTIONS)), allow_pickle=False)
        except (ValueError, OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._fail(member, f"{type(exc).__name__}: {exc}") from None
        return Sample(key, latents, actions, meta), f"{key}.{LATENTS}"


class MdsShardReader(ShardReader):
    """mosaicml-streaming's MDS shard reader, addressed by position (in place, or through the cache)."""

    def __init__(self, manifest: Manifest, entry: ShardEntry, shards: MdsShards) -> None:
        super().__init__(manifest, entry)
        self._shards = shards

    def _fetch(self, index: int) -> tuple[Sample, str]:
        member = f"sample {index}"
        try:
            data = self._shards.get(self.entry.path, index)
            key = str(data["key"])
            member = f"sample {index} ({key})"
            meta = data["meta"]
            if not isinstance(meta, dict):
                raise ValueError("the meta column is not a JSON object")
            sample = Sample(key, data["latents"], data.get("actions"), meta)
        except StorageError:
            raise  # the store failed, not the shard: never mistake it for damage
        except Exception as exc:  # the MDS decoder raises many types on damaged bytes
            raise self._fail(member, f"{type(exc).__name__}: {exc}") from None
        return sample, member


def mds_index_objects(manifest: Manifest) -> dict[str, dict]:
    """Each MDS shard's description in its encode job's index.json, keyed by the shard's path in the
    manifest, checked against the manifest (one read per job, local or in a bucket)."""
    objs: dict[str, dict] = {}
    indexes_read: set[Location] = set()
    for entry in manifest.shards_for("mds"):
        shard_path = manifest.root / entry.path
        index_path = shard_path.parent / "index.json"
        if index_path not in indexes_read:
            indexes_read.add(index_path)
            job_dir = shard_path.parent.relative_to(manifest.root)
            try:
                for obj in json.loads(index_path.read_text())["shards"]:
                    objs[f"{job_dir}/{obj['raw_data']['basename']}"] = obj
            except MissingObject:
                raise ManifestError(f"MDS index {index_path} for shard {shard_path} is missing") from None
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise ManifestError(f"MDS index {index_path} is not a valid index.json ({type(exc).__name__}: "
                                    f"{exc})") from None
        obj = objs.get(entry.path)
        if obj is None:
            raise ManifestError(f"MDS shard {shard_path} is listed in the manifest but not in its index.json")
        if obj.get("samples") != entry.samples or obj["raw_data"].get("bytes") != entry.bytes:
            raise ManifestError(f"MDS index {index_path} records {obj.get('samples')} samples and "
                                f"{obj['raw_data'].get('bytes')} bytes for {entry.path} but the manifest records "
                                f"{entry.samples} samples and {entry.bytes} bytes; the index and the manifest come "
                                "from different encodes")
    return objs


def open_shards(manifest: Manifest, fmt: str, cache: CacheSettings | None = None) -> list[ShardReader]:
    """Readers of every shard of ``fmt``; ``cache`` says where a bucket's MDS shards are cached."""
    entries = manifest.shards_for(fmt)
    if fmt == "webdataset":
        return [TarShardReader(manifest, e) for e in entries]
    shards = open_mds(manifest.root, mds_index_objects(manifest), manifest.fingerprint(fmt), cache)
    return [MdsShardReader(manifest, entry, shards) for entry in entries]


def check_shard_files(manifest: Manifest, fmt: str) -> list[tuple[Location, str]]:
    """Cheap start-up check: every shard exists with the recorded size. Returns (path, problem) pairs."""
    entries = manifest.shards_for(fmt)
    sizes = manifest.root.file_sizes([e.path for e in entries])
    problems = []
    for entry in entries:
        path = manifest.root / entry.path
        if entry.path not in sizes:
            problems.append((path, "missing"))
        elif (size := sizes[entry.path]) != entry.bytes:
            problems.append((path, f"{size} bytes but the manifest records {entry.bytes} (truncated or rewritten)"))
    return problems
