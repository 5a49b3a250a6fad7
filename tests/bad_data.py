"""Damage a copy of a small latent dataset the way real data goes wrong, keeping the manifest's sizes
and hashes consistent, so each case reaches the check it is aimed at (not the sha256 check)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from scd_train.data.manifest import MANIFEST, file_sha256, latent_crc

Members = list[tuple[str, bytes]]


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def edit_manifest(root: Path, change) -> None:
    manifest = read_manifest(root)
    change(manifest)
    write_manifest(root, manifest)


def first_tar(root: Path) -> str:
    return read_manifest(root)["formats"]["webdataset"]["shards"][0]["path"]


def tar_members(path: Path) -> Members:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_tar_members(path: Path, members: Members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def rewrite_tar(root: Path, rel: str, transform, samples: int | None = None) -> None:
    """Apply ``transform(members) -> members`` to shard ``rel`` and re-record its size and sha256
    (and sample count, when given) in the manifest, as a careless re-export would."""
    path = root / rel
    write_tar_members(path, transform(tar_members(path)))

    def record(manifest):
        for entry in manifest["formats"]["webdataset"]["shards"]:
            if entry["path"] == rel:
                entry["bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
                if samples is not None:
                    entry["samples"] = samples

    edit_manifest(root, record)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def change_first_sample(members: Members, latents=None, actions=None) -> Members:
    """Replace the first sample's latents (``latents(array) -> array``) and/or actions, fixing its CRC."""
    key = members[0][0].split(".", 1)[0]
    fields = {name.split(".", 1)[1]: i for i, (name, _) in enumerate(members) if name.split(".", 1)[0] == key}
    out = list(members)
    if latents is not None:
        array = latents(np.load(io.BytesIO(members[fields["latents.npy"]][1])))
        out[fields["latents.npy"]] = (f"{key}.latents.npy", _npy(array))
        meta = json.loads(members[fields["json"]][1])
        meta["latents_crc32"] = latent_crc(array)
        out[fields["json"]] = (f"{key}.json", json.dumps(meta).encode())
    if actions is not None:
        array = actions(np.load(io.BytesIO(members[fields["actions.npy"]][1])))
        out[fields["actions.npy"]] = (f"{key}.actions.npy", _npy(array))
    return out


def sample_groups(members: Members) -> list[Members]:
    groups: list[Members] = []
    for name, data in members:
        if groups and groups[-1][0][0].split(".", 1)[0] == name.split(".", 1)[0]:
            groups[-1].append((name, data))
        else:
            groups.append([(name, data)])
    return groups


def append_copy_of_first(members: Members) -> Members:
    """A duplicate of the first sample after the counted ones (a doubled write)."""
    return members + sample_groups(members)[0]


def append_extra_sample(members: Members) -> Members:
    """One more sample, with a new key, after the counted ones."""
    first = sample_groups(members)[0]
    key = first[0][0].split(".", 1)[0]
    return members + [(name.replace(key, key + "-extra", 1), data) for name, data in first]


def scatter_first_sample(members: Members) -> Members:
    """The first sample's metadata member moved behind the second sample (members not contiguous)."""
    groups = sample_groups(members)
    meta = [m for m in groups[0] if m[0].endswith(".json")]
    rest = [m for m in groups[0] if not m[0].endswith(".json")]
    return rest + groups[1] + meta + [m for g in groups[2:] for m in g]


def every_tar(root: Path, transform) -> None:
    for entry in read_manifest(root)["formats"]["webdataset"]["shards"]:
        rewrite_tar(root, entry["path"], transform)


def every_sample(latents=None, actions=None):
    """A tar transform applying ``latents``/``actions`` to every sample of a shard."""
    def transform(members):
        out = []
        for group in sample_groups(members):
            out += change_first_sample(group, latents=latents, actions=actions)
        return out
    return transform


def bump_mds_index(root: Path) -> None:
    """The first MDS job's index.json claims one sample more than the manifest (an index from another encode)."""
    path = root / "mds" / "shard-000000" / "index.json"
    index = json.loads(path.read_text())
    index["shards"][0]["samples"] += 1
    path.write_text(json.dumps(index))
