"""scd-data: synthetic videos through PyAV, the small VAE, encoding to both formats (round trip, bad
inputs, strict mode, idempotence, a killed and rerun encode) and verification."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_helpers import (
    CLIP_FRAMES,
    FRAME_SIZE,
    STRIDE,
    clips_per_video,
    encode_options,
    save_random_vae,
    write_inputs,
)

from data_prep.cli import main as cli_main
from data_prep.encode import EncodeError, encode
from data_prep.inputs import list_inputs, read_frames
from data_prep.verify import verify
from scd_train.data.manifest import load_manifest
from scd_train.data.shard_readers import open_shards
from scd_train.data.vae import encode_pixels, load_vae, vae_info
from scd_train.video import write_mp4

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    save_random_vae(root / "vae")
    write_inputs(root / "videos")
    return root


def read_all(root: Path, fmt: str) -> dict[str, object]:
    manifest = load_manifest(root)
    return {s.key: s for r in open_shards(manifest, fmt) for s in (r.read(i) for i in range(len(r)))}


def test_encode_round_trip_both_formats(workdir, tmp_path):
    out = tmp_path / "shards"
    summary = encode(encode_options(workdir / "videos", out, workdir / "vae"))
    assert summary.clips == sum(clips_per_video()) and not summary.bad
    manifest = load_manifest(out)
    raw = json.loads((out / "manifest.json").read_text())
    info = vae_info(workdir / "vae")
    assert manifest.latent_shape == (CLIP_FRAMES, 4, FRAME_SIZE // 8, FRAME_SIZE // 8)
    assert raw["vae"]["config_sha256"] == info.config_sha256 and raw["video"]["stride"] == STRIDE
    assert raw["actions"] == {"present": True, "num_classes": 4}
    assert manifest.normalization.kind == "channel_stats" and len(raw["normalization"]["std"]) == 4
    for fmt in ("webdataset", "mds"):
        assert all(len(s.sha256) == 64 and s.samples > 0 for s in manifest.shards_for(fmt))
    wds, mds = read_all(out, "webdataset"), read_all(out, "mds")
    assert sorted(wds) == sorted(mds) and len(wds) == summary.clips
    # a clip's latents are the VAE's encoding of exactly those source frames, and its actions those frames' actions
    frames = np.load(workdir / "videos" / "video-02.npy")
    actions = np.load(workdir / "videos" / "video-02.actions.npy")
    sample = wds["video-02_npy-000006"]
    vae = load_vae(workdir / "vae")
    pixels = torch.from_numpy(frames[6:6 + CLIP_FRAMES]).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(sample.latents, encode_pixels(vae, pixels).numpy(), atol=2e-3)
    np.testing.assert_array_equal(sample.actions, actions[6:6 + CLIP_FRAMES])
    np.testing.assert_array_equal(mds["video-02_npy-000006"].latents, sample.latents)
    assert sample.meta["video"] == "video-02.npy" and sample.meta["start"] == 6
    report = verify(out, progress=False)
    assert report.ok and report.samples == 2 * summary.clips


def test_mds_shards_are_readable_by_streaming_dataset(workdir, tmp_path, monkeypatch):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    out = tmp_path / "shards"
    encode(encode_options(workdir / "videos", out, workdir / "vae", formats=["mds"]))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    clean_stale_shared_memory()
    dataset = StreamingDataset(local=str(out / "mds"), remote=None, shuffle=False, batch_size=4)
    keys = sorted(dataset[i]["key"] for i in range(len(dataset)))
    assert keys == sorted(read_all(out, "mds"))


def test_bad_inputs_are_reported_by_name_and_strict_fails(workdir, tmp_path, capsys):
    videos = tmp_path / "videos"
    shutil.copytree(workdir / "videos", videos)
    (videos / "broken.mp4").write_bytes(b"not a video at all" * 50)
    (videos / "broken.actions.npy").write_bytes(b"")
    np.save(videos / "short.npy", np.zeros((2, FRAME_SIZE, FRAME_SIZE, 3), np.uint8))
    np.save(videos / "short.actions.npy", np.zeros(2, np.int64))
    np.save(videos / "wrong-actions.npy", np.zeros((8, FRAME_SIZE, FRAME_SIZE, 3), np.uint8))
    np.save(videos / "wrong-actions.actions.npy", np.zeros(5, np.int64))
    np.save(videos / "no-actions.npy", np.zeros((8, FRAME_SIZE, FRAME_SIZE, 3), np.uint8))
    summary = encode(encode_options(videos, tmp_path / "out", workdir / "vae", formats=["webdataset"]))
    reasons = {b["input"]: b["reason"] for b in summary.bad}
    assert set(reasons) == {"broken.mp4", "short.npy", "wrong-actions.npy", "no-actions.npy"}
    assert "unreadable" in reasons["broken.mp4"] and "too short" in reasons["short.npy"]
    assert "actions shape (5,)" in reasons["wrong-actions.npy"] and "missing" in reasons["no-actions.npy"]
    assert summary.clips == sum(clips_per_video())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["bad_inputs"] == summary.bad

    args = ["encode", str(videos), "--vae", str(workdir / "vae"), "--out", str(tmp_path / "strict"), "--size",
            str(FRAME_SIZE), "--clip-frames", str(CLIP_FRAMES), "--format", "webdataset", "--workers", "1",
            "--strict", "--quiet"]
    assert cli_main(args) == 2  # bad input
    err = capsys.readouterr().err
    assert "--strict: 4 bad input(s)" in err and "broken.mp4" in err
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_rerun_is_idempotent_and_changed_options_are_refused(workdir, tmp_path):
    out = tmp_path / "shards"
    opts = encode_options(workdir / "videos", out, workdir / "vae", workers=2)
    first = encode(opts)
    before = {p: p.read_bytes() for p in out.rglob("*.tar")} | {p: p.read_bytes() for p in out.rglob("*.mds")}
    samples = read_all(out, "mds")
    again = encode(opts)
    assert again.jobs_done == 0 and again.jobs_reused == first.jobs_done
    assert all(p.read_bytes() == data for p, data in before.items())
    # a record whose shard vanished is redone with the same samples (shards depend on inputs and options only)
    shutil.rmtree(out / "mds" / "shard-000001")
    assert encode(opts).jobs_done == 1
    redone = read_all(out, "mds")
    assert sorted(redone) == sorted(samples)
    for key, sample in samples.items():
        np.testing.assert_allclose(redone[key].latents, sample.latents, atol=1e-5)
    assert verify(out, progress=False).ok
    with pytest.raises(EncodeError, match=r"stride: was 2, now 3"):
        encode(encode_options(workdir / "videos", out, workdir / "vae", formats=["webdataset"], stride=3))


def test_killed_encode_finishes_on_rerun_with_exactly_the_right_samples(workdir, tmp_path, subprocess_env,
                                                                      python_exe):
    videos = tmp_path / "videos"
    write_inputs(videos, lengths=[8] * 12, seed=1)  # 12 videos, one per shard job
    out = tmp_path / "shards"
    cmd = [python_exe, "-m", "data_prep", "encode", str(videos), "--vae", str(workdir / "vae"), "--out", str(out),
           "--size", str(FRAME_SIZE), "--clip-frames", str(CLIP_FRAMES), "--stride", str(STRIDE),
           "--videos-per-shard", "1", "--workers", "1", "--format", "webdataset", "--quiet"]
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "records"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(records.glob("*.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(records.glob("*.json")))
    assert 3 <= done_before < 12, "the encode should have been killed part-way"
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done_before} already complete" in rerun.stdout
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    expected = sorted(f"video-{i:02d}_npy-{s:06d}" for i in range(12) for s in range(0, 8 - CLIP_FRAMES + 1, STRIDE))
    assert sorted(read_all(out, "webdataset")) == expected  # no sample missing, none twice
    assert verify(out, progress=False).ok


def test_verify_reports_a_damaged_shard(workdir, tmp_path):
    out = tmp_path / "shards"
    encode(encode_options(workdir / "videos", out, workdir / "vae", formats=["webdataset"]))
    shard = out / load_manifest(out).shards_for("webdataset")[0].path
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify(out, progress=False)
    assert not report.ok and any("sha256" in p and str(shard) in p for p in report.problems)


def test_synth_writes_mp4_that_read_back_with_actions(tmp_path):
    assert cli_main(["synth", "--out", str(tmp_path), "--num-videos", "4", "--frames", "6", "--size", "32",
                     "--digit-scale", "2", "--holdout-fraction", "0.25", "--quiet"]) == 0
    inputs = list_inputs(tmp_path / "train")
    assert [i.name for i in inputs] == ["synthetic-000000.mp4", "synthetic-000001.mp4", "synthetic-000002.mp4"]
    frames, fps = read_frames(inputs[0], default_fps=1.0)
    assert frames.shape == (6, 32, 32, 3) and fps == 8.0 and frames.max() > 100
    assert np.load(inputs[0].actions_path).shape == (6,)
    assert len(list_inputs(tmp_path / "holdout")) == 1


def test_frame_folders_and_webm_are_inputs(workdir, tmp_path):
    from PIL import Image

    frames = np.load(workdir / "videos" / "video-01.npy")
    folder = tmp_path / "in" / "clip-a"
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames[:8]):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    write_mp4(frames[:8], tmp_path / "in" / "clip-b.mp4")
    inputs = list_inputs(tmp_path / "in")
    assert [(i.name, i.kind) for i in inputs] == [("clip-a", "frames"), ("clip-b.mp4", "video")]
    np.testing.assert_array_equal(read_frames(inputs[0], 8.0)[0], frames[:8])  # PNG is lossless
    summary = encode(encode_options(tmp_path / "in", tmp_path / "out", workdir / "vae", formats=["webdataset"],
                                    num_actions=None, height=16, width=24))
    assert summary.clips == 2 * ((8 - CLIP_FRAMES) // STRIDE + 1) and not summary.bad
    assert load_manifest(tmp_path / "out").latent_shape == (CLIP_FRAMES, 4, 2, 3)
    assert not load_manifest(tmp_path / "out").has_actions


def test_train_vae_saves_a_diffusers_folder_that_encodes(workdir, tmp_path, capsys):
    out = tmp_path / "vae"
    assert cli_main(["train-vae", str(workdir / "videos"), "--out", str(out), "--size", "16", "--steps", "3",
                     "--batch-size", "4", "--base-channels", "8", "--quiet"]) == 0
    info = vae_info(out)
    assert info.class_name == "AutoencoderKL" and info.spatial_compression == 8 and info.latent_channels == 4
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 3 and np.isfinite(report["psnr_db"])
    latents = encode_pixels(load_vae(out), torch.zeros(2, 3, 16, 16))
    assert latents.shape == (2, 4, 2, 2)
    assert cli_main(["train-vae", str(workdir / "videos"), "--out", str(out), "--steps", "1", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [1, 10, 11, 25])
def test_vae_learning_rate_schedule_works_for_any_run_length(steps):
    from data_prep.train_vae import lr_schedule

    optim = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = lr_schedule(optim, 1e-3, steps)
    rates = []
    for _ in range(steps):
        rates.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    assert len(rates) == steps and all(0 <= r <= 1e-3 + 1e-12 for r in rates)
    assert max(rates) > 0 and rates[-1] < max(rates) or steps == 1
