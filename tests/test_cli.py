"""The command-line tools end to end on a few training steps: train, sample, export, reload."""

import av
import pytest
import torch
from safetensors import safe_open

from scd_train import sample, train, weights
from scd_train.data.holdout import holdout_clips

SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "data.synthetic.num_videos=16",
         "data.synthetic.frames_per_video=8", "data.clip_frames=4", "data.batch_size=4", "train.steps=3",
         "log.progress_bar=false", "log.wandb=disabled"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    assert train.main(["--config", "configs/tiny.yaml", *SMALL, f"train.run_dir={path}"]) == 0
    return path


def test_bad_override_exits_with_a_message_naming_the_key(capsys):
    assert train.main(["--config", "configs/tiny.yaml", "optim.decoder_lr_ration=2"]) == 2
    assert "decoder_lr_ratio" in capsys.readouterr().err


def test_missing_shard_directory_exits_with_a_message_naming_the_setting(tmp_path, capsys):
    missing = tmp_path / "no-shards"
    args = ["--config", "configs/tiny_shards.yaml", f"data.path={missing}", f"train.run_dir={tmp_path / 'run'}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "data.path=" in err and str(missing) in err and "scd-data encode" in err


def test_sample_writes_playable_videos(run_dir, tmp_path):
    out = tmp_path / "samples"
    assert sample.main([str(run_dir), "--clips", "2", "--context", "3", "--unroll", "4", "--steps", "2",
                        "--out", str(out)]) == 0
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2 and len(list(out.glob("*.gif"))) == 2
    with av.open(str(videos[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 7
    assert frames[0].shape[1] >= 2 * frames[0].shape[0]  # ground truth | generated


def test_export_holds_ema_weights_and_reloads_to_the_same_model(run_dir, tmp_path):
    out = tmp_path / "ema.safetensors"
    assert weights.main([str(run_dir), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["weights"] == "ema"
    from_run, cfg = weights.load_model(run_dir)
    from_file, cfg_file = weights.load_model(out)
    assert cfg_file == cfg
    for (name, a), (_, b) in zip(from_run.state_dict().items(), from_file.state_dict().items()):
        assert torch.equal(a, b), name
    clips, _ = holdout_clips(cfg, 4)
    batch = clips.collate([0])
    with torch.no_grad():
        assert torch.equal(from_run.encoder(batch.latents), from_file.encoder(batch.latents))


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert weights.main([str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here" in capsys.readouterr().err
