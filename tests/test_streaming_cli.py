"""Endless sampling from the command line, and held-out quality by horizon in scd-eval."""

import json

import av
import pytest

from scd_train import sample, train
from scd_train.eval import cli as eval_cli

SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.max_frames=8", "model.attention=sdpa",
         "data.synthetic.num_videos=16", "data.synthetic.frames_per_video=8", "data.clip_frames=4",
         "data.batch_size=4", "train.steps=2", "log.progress_bar=false", "log.wandb=disabled"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    paths = {"windowed": root / "windowed", "full": root / "full"}
    window = ["model.encoder_window=2", "model.encoder_sink_frames=1"]
    assert train.main(["--config", "configs/tiny.yaml", *SMALL, *window, f"train.run_dir={paths['windowed']}"]) == 0
    assert train.main(["--config", "configs/tiny.yaml", *SMALL, f"train.run_dir={paths['full']}"]) == 0
    return paths


def test_sample_streams_a_windowed_run_past_max_frames_and_the_ground_truth(runs, tmp_path):
    out = tmp_path / "samples"
    # 2 + 14 = 16 frames: twice model.max_frames=8 and twice the 8-frame held-out clips
    assert sample.main([str(runs["windowed"]), "--clips", "1", "--context", "2", "--unroll", "14", "--steps", "1",
                        "--compile", "off", "--out", str(out)]) == 0
    with av.open(str(out / "sample_000.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16
    half = frames[-1].shape[1] // 2
    assert frames[-1][:, :half - 2].max() == 0  # no ground truth that far: a black panel
    assert frames[3][:, :half - 2].max() > 0


def test_sample_refuses_a_full_history_run_past_max_frames(runs, tmp_path, capsys):
    code = sample.main([str(runs["full"]), "--clips", "1", "--context", "2", "--unroll", "7", "--steps", "1",
                        "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--context 2 + --unroll 7 = 9 frames exceed the model's model.max_frames=8" in err
    assert "model.encoder_window" in err and not (tmp_path / "x").exists()
    assert "Traceback" not in err


def test_eval_reports_quality_by_horizon_before_and_after_the_window(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--scd", str(runs["windowed"]), "--baseline", str(runs["full"]), "--context", "2", "--unroll", "6",
            "--horizons", "1,3,6", "--clips", "2", "--trajectories", "1", "--steps", "1", "--sheet-clips", "0",
            "--wandb", "disabled", "--out", str(out)]
    assert eval_cli.main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    for name in ("scd", "baseline"):
        by_horizon = result["models"][name]["by_horizon"]
        assert by_horizon["horizons"] == [1, 3, 6]
        assert len(by_horizon["psnr"]) == 3 and all(0 < v < 100 for v in by_horizon["psnr"])
        assert len(by_horizon["ssim"]) == 3
    assert result["protocol"]["horizons"] == [1, 3, 6]
    assert "PSNR (dB) of frame +6" in capsys.readouterr().out
    assert eval_cli.main([*args[:8], "--horizons", "7", *args[10:]]) == 2
    assert "eval.horizons=[7]" in capsys.readouterr().err
