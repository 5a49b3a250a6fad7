"""The shard loader: same batches from both formats, exact resume, rank/worker splits over uneven
shards, corrupt and truncated shards, manifest checks, and training + sampling from shards."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_helpers import CLIP_FRAMES, build_dataset, clips_per_video

from scd_train.config import config_from_text
from scd_train.data import build_train_loader
from scd_train.data.manifest import ManifestError, load_manifest
from scd_train.data.shard_loader import ShardLoader
from scd_train.data.shard_readers import CorruptSampleError
from scd_train.data.shards import check_manifest

FORMATS = ("webdataset", "mds")
TOTAL = sum(clips_per_video())



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("latents"))


def make_loader(root: Path, fmt: str, **kw) -> ShardLoader:
    args = dict(batch_size=4, seed=3, clip_frames=CLIP_FRAMES, use_actions=True)
    args.update(kw)
    return ShardLoader(load_manifest(root), fmt, **args)


def take(loader: ShardLoader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def keys(batches) -> list[list[str]]:
    return [b.keys for b in batches]


def test_shards_are_uneven_and_both_formats_give_identical_batches(dataset):
    manifest = load_manifest(dataset)
    counts = [s.samples for s in manifest.shards_for("webdataset")]
    assert sum(counts) == TOTAL and len(set(counts)) > 1
    assert [s.samples for s in manifest.shards_for("mds")] == counts
    wds_batches, mds_batches = take(make_loader(dataset, "webdataset"), 5), take(make_loader(dataset, "mds"), 5)
    assert keys(wds_batches) == keys(mds_batches)
    for a, b in zip(wds_batches, mds_batches):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.actions, b.actions)
        assert a.latents.shape == (4, CLIP_FRAMES, 4, 4, 4) and a.actions.dtype == torch.int64


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_continues_with_exactly_the_same_samples(dataset, fmt):
    # 16 batches per epoch: 20 steps cross an epoch boundary; the resume point is mid-epoch
    full = keys(take(make_loader(dataset, fmt, num_workers=2), 20))
    first = make_loader(dataset, fmt, num_workers=2)
    it = iter(first)
    head = [next(it).keys for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    del it
    resumed = make_loader(dataset, fmt, num_workers=0)
    resumed.load_state_dict(state)
    tail = keys(take(resumed, 13))
    assert head + tail == full
    assert full[:16] != full[16:20] + full[4:16]  # the second epoch is a new order


def test_resume_refuses_other_data_or_topology(dataset):
    state = make_loader(dataset, "webdataset").state_dict()
    with pytest.raises(ValueError, match="world_size=1 cannot resume with world_size=2"):
        make_loader(dataset, "webdataset", world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="format='webdataset' cannot resume with format='mds'"):
        make_loader(dataset, "mds").load_state_dict(state)


def test_two_ranks_two_workers_split_uneven_shards_evenly(dataset):
    loaders = [make_loader(dataset, "mds", rank=r, world_size=2, num_workers=2) for r in range(2)]
    per_epoch = TOTAL // 8
    assert [ld.batches_per_epoch for ld in loaders] == [per_epoch, per_epoch]
    epochs = [keys(take(ld, 2 * per_epoch)) for ld in loaders]
    first = [{k for b in e[:per_epoch] for k in b} for e in epochs]
    assert len(first[0]) == len(first[1]) == per_epoch * 4
    assert not first[0] & first[1]  # ranks never share a sample within an epoch
    assert epochs[0][per_epoch:] != epochs[0][:per_epoch]
    # more ranks x workers than shards still gives every rank the same number of full batches
    many = [make_loader(dataset, "webdataset", rank=r, world_size=4, num_workers=2, batch_size=2) for r in range(4)]
    assert len({ld.batches_per_epoch for ld in many}) == 1
    assert all(len(b.keys) == 2 for ld in many for b in take(ld, 3))


def _flip_tar_member(path: Path, member_suffix: str, index: int = 1) -> str:
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(member_suffix)]
    target = members[index]
    with open(path, "r+b") as f:
        f.seek(target.offset_data + target.size - 8)
        data = bytearray(f.read(4))
        f.seek(target.offset_data + target.size - 8)
        f.write(bytes(b ^ 0xFF for b in data))
    return target.name


def _copy(dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    shutil.copytree(dataset, root)
    return root


def test_corrupt_member_names_shard_and_member_or_is_skipped_and_counted(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    shard = root / load_manifest(root).shards_for("webdataset")[1].path
    member = _flip_tar_member(shard, ".latents.npy")
    per_epoch = TOTAL // 4
    with pytest.raises(CorruptSampleError) as err:
        take(make_loader(root, "webdataset", num_workers=2), per_epoch)
    assert str(shard) in str(err.value) and member in str(err.value) and "checksum" in str(err.value)

    skipping = make_loader(root, "webdataset", on_corrupt="skip", max_corrupt_skips=3)
    batches = take(skipping, per_epoch)
    bad_key = member.split(".")[0]
    assert skipping.corrupt_skips == 1 and all(bad_key not in b.keys for b in batches)
    assert keys(batches) == keys(take(make_loader(root, "webdataset", on_corrupt="skip", max_corrupt_skips=3,
                                                  num_workers=2), per_epoch))
    with pytest.raises(CorruptSampleError, match="more than data.max_corrupt_skips=0"):
        take(make_loader(root, "webdataset", on_corrupt="skip", max_corrupt_skips=0), per_epoch)


def test_corrupt_mds_bytes_name_the_shard(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    entry = load_manifest(root).shards_for("mds")[0]
    shard = root / entry.path
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):  # somewhere inside the samples' bytes
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptSampleError) as err:
        take(make_loader(root, "mds"), TOTAL // 4)
    assert str(shard) in str(err.value) and "member sample" in str(err.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_shard_is_refused_at_start_or_skipped_with_a_cap(dataset, tmp_path, fmt):
    root = _copy(dataset, tmp_path)
    entry = load_manifest(root).shards_for(fmt)[2]
    shard = root / entry.path
    shard.write_bytes(shard.read_bytes()[: int(entry.bytes * 0.6)])
    with pytest.raises(CorruptSampleError) as err:
        make_loader(root, fmt)
    assert str(shard) in str(err.value) and "truncated" in str(err.value)
    if fmt == "webdataset":
        assert re.search(r"(first damaged member|readable up to member): \S+\.(npy|json)", str(err.value))
    skipping = make_loader(root, fmt, on_corrupt="skip", max_corrupt_skips=entry.samples)
    batches = take(skipping, TOTAL // 4)
    assert 1 <= skipping.corrupt_skips < entry.samples and all(len(b.keys) == 4 for b in batches)
    with pytest.raises(CorruptSampleError, match="max_corrupt_skips"):
        take(make_loader(root, fmt, on_corrupt="skip", max_corrupt_skips=0), TOTAL // 4)


TINY_MODEL = """
model: {{latent_channels: {channels}, latent_height: 4, latent_width: 4, patch_size: 1, width: 32, num_heads: 2,
        head_dim: 16, rope_axes: [4, 6, 6], encoder_layers: 1, decoder_layers: 1, layers: 2, num_actions: 4,
        max_frames: 16}}
diffusion: {{decoder_multi_batch: 1, sample_steps: 2}}
optim: {{lr: 1.0e-3, warmup_steps: 1}}
data: {{source: {fmt}, path: {path}, holdout_path: {path}, clip_frames: {frames}, batch_size: 4}}
train: {{steps: 4, precision: fp32, device: cpu, run_dir: {run_dir}, checkpoint_every: 2}}
log: {{wandb: disabled, progress_bar: false, every: 2}}
"""


def tiny_config(root: Path, run_dir: Path, fmt: str = "webdataset", channels: int = 4, frames: int = CLIP_FRAMES,
                overrides: list[str] | None = None):
    text = TINY_MODEL.format(channels=channels, fmt=fmt, path=root, frames=frames, run_dir=run_dir)
    return config_from_text(text, overrides)


def test_manifest_mismatches_name_both_values(dataset, tmp_path):
    manifest = load_manifest(dataset)
    with pytest.raises(ManifestError, match=r"model.latent_channels=8 but .* latent channels 4"):
        build_train_loader(tiny_config(dataset, tmp_path, channels=8))
    with pytest.raises(ManifestError, match=r"model.latent_height=8 but .* latent height 4"):
        check_manifest(manifest, tiny_config(dataset, tmp_path, overrides=["model.latent_height=8"]), 4)
    with pytest.raises(ManifestError, match=r"6 frames per clip .* clips of 4 frames"):
        check_manifest(manifest, tiny_config(dataset, tmp_path), 6)
    with pytest.raises(ManifestError, match=r"data.normalization='scaling_factor' but .* 'channel_stats'"):
        check_manifest(manifest, tiny_config(dataset, tmp_path, overrides=["data.normalization=scaling_factor"]), 4)
    with pytest.raises(ManifestError, match=r"model.num_actions=3 but .* 4 action classes"):
        check_manifest(manifest, tiny_config(dataset, tmp_path, overrides=["model.num_actions=3"]), 4)
    broken = tmp_path / "broken"
    broken.mkdir()
    raw = json.loads((dataset / "manifest.json").read_text())
    del raw["normalization"]
    (broken / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="required key 'normalization' is missing"):
        load_manifest(broken)


def test_training_resumes_on_shards_and_samples_decode_through_the_vae(dataset, tmp_path):
    from scd_train.sample import SampleRequest, rollout_clips
    from scd_train.trainer import Trainer

    cfg = tiny_config(dataset, tmp_path / "run", fmt="mds")
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.step == 4 and np.isfinite(result.losses[-1][1])
    assert trainer.loader.state_dict()["batches_consumed"] == 4
    resumed = Trainer(tiny_config(dataset, tmp_path / "run", fmt="mds", overrides=["train.steps=6"]))
    assert resumed.loader.state_dict()["batches_consumed"] == 4
    fresh = make_loader(dataset, "mds", seed=0)
    expected = keys(take(fresh, 5))[4]
    assert next(iter(resumed.loader)).keys == expected

    batch, rollout, codec = rollout_clips(trainer.backend.module, cfg, SampleRequest(clips=2, context=2, unroll=2))
    pixels = codec.decode(rollout.frames.cpu())
    assert pixels.shape == (2, 4, 3, 32, 32) and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    # the codec is the VAE (and normalization) that made the shards: re-encoding the source frames matches
    sample_key = batch.keys[0].split("/")[0]
    video, start = sample_key.rsplit("-", 1)
    frames = np.load(dataset.parent / "videos" / video.replace("_npy", ".npy"))[int(start):int(start) + 4]
    again = codec.encode(torch.from_numpy(frames).permute(0, 3, 1, 2))
    assert torch.allclose(again, batch.latents[0], atol=2e-3)


GLOO_SCRIPT = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_shard_loader import make_loader
from pathlib import Path
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loader = make_loader(Path({root!r}), "webdataset", rank=rank, world_size=world, num_workers=2)
it = iter(loader)
mine = [next(it).keys for _ in range(loader.batches_per_epoch)]
gathered = [None] * world
dist.all_gather_object(gathered, mine)
if rank == 0:
    print("RESULT " + json.dumps(gathered))
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def test_two_gloo_processes_with_two_workers_each(dataset, tmp_path, subprocess_env, python_exe):
    script = tmp_path / "ranks.py"
    script.write_text(GLOO_SCRIPT.format(tests=str(Path(__file__).parent), root=str(dataset)))
    env = dict(subprocess_env, TMPDIR=str(tmp_path))
    proc = subprocess.run([python_exe, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    per_rank = json.loads(line[len("RESULT "):])
    assert len(per_rank[0]) == len(per_rank[1]) == TOTAL // 8
    flat = [[k for b in r for k in b] for r in per_rank]
    assert not set(flat[0]) & set(flat[1])
    expected = [keys(take(make_loader(dataset, "webdataset", rank=r, world_size=2), TOTAL // 8)) for r in range(2)]
    assert per_rank == expected  # the same batches as the in-process construction of each rank

