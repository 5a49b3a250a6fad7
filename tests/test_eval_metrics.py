"""Video metrics on known inputs, best-of-k aggregation, LPIPS/FVD from local weight files."""

from __future__ import annotations

import math

import pytest
import torch

from scd_train.config import ConfigError
from scd_train.errors import InputError
from scd_train.eval.evaluate import ModelTally, official_round_trip
from scd_train.eval.feature_metrics import LPIPS, VideoFeatures, frechet_distance
from scd_train.eval.metrics import (
    PSNR_CAP_DB,
    best_of_k,
    per_frame_mse,
    psnr_from_mse,
    selection_rule,
    video_scores,
)
from scd_train.eval.next_frame import psnr_per_clip
from scd_train.eval.protocol import EvalProtocol, build_protocol


def _video(frames: int = 4, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, size, size, generator=g) * 0.8 + 0.1  # headroom for offsets


def test_identical_videos_score_perfectly_with_capped_psnr():
    video = _video()
    scores = video_scores(video, video.clone())
    assert scores["mse"] == 0.0
    assert scores["psnr"] == pytest.approx(PSNR_CAP_DB)
    assert math.isfinite(scores["psnr"])
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_constant_offset_gives_exact_mse_and_psnr():
    video = _video()
    scores = video_scores(video + 0.1, video)
    assert scores["mse"] == pytest.approx(0.01, rel=1e-6)
    assert scores["psnr"] == pytest.approx(20.0, rel=1e-6)
    assert scores["ssim"] < 1.0


def test_spatially_shifted_video_scores_worse_than_identity():
    video = _video(size=32)
    shifted = torch.roll(video, shifts=3, dims=-1)
    near = video_scores(video + 0.01, video)
    far = video_scores(shifted, video)
    assert far["mse"] > near["mse"] > 0
    assert far["psnr"] < near["psnr"]
    assert far["ssim"] < near["ssim"] < 1.0


def test_video_psnr_from_mean_mse_differs_from_per_frame_mean():
    truth = _video(frames=2)
    pred = truth.clone()
    pred[1] += 0.1  # frame 0 exact (MSE 0), frame 1 MSE 0.01
    robust = video_scores(pred, truth)["psnr"]
    per_frame = video_scores(pred, truth, per_frame_psnr=True)["psnr"]
    assert robust == pytest.approx(10 * math.log10(1 / 0.005), rel=1e-6)
    assert per_frame == pytest.approx((PSNR_CAP_DB + 20.0) / 2, rel=1e-6)


def test_psnr_cap_and_next_frame_psnr_never_infinite():
    assert float(psnr_from_mse(torch.tensor(0.0))) == pytest.approx(PSNR_CAP_DB)
    assert float(psnr_from_mse(torch.tensor(1e-4))) == pytest.approx(40.0)
    frames = _video(frames=3)
    values = psnr_per_clip(frames, frames.clone())
    assert torch.isfinite(values).all() and torch.allclose(values, torch.full((3,), PSNR_CAP_DB))


def test_metric_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"\(4, 3, 24, 24\) and \(4, 3, 24, 12\)"):
        per_frame_mse(_video(), _video()[..., :12])


def test_best_of_k_and_selection_rules():
    table = torch.tensor([[1.0, 3.0], [5.0, 2.0]])
    assert best_of_k(table, "max").tolist() == [3.0, 5.0]
    assert best_of_k(table, "min").tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="'max' or 'min'"):
        best_of_k(table, "mean")
    assert selection_rule("psnr", official=False) == "max"
    assert selection_rule("lpips", official=True) == "min"
    assert selection_rule("mse", official=False) == "min"
    assert selection_rule("mse", official=True) == "max"  # the reference evaluation keeps the worst


def test_tally_keeps_best_trajectory_and_official_worst_mse():
    truth = _video(frames=6)[None]  # (B=1, F, 3, H, W)
    good, bad = truth[0].clone(), truth[0].clone()
    good[2:] += 0.01
    bad[2:] += 0.1
    samples = torch.stack([bad, good])[None]  # (B=1, K=2, F, ...)
    protocol = EvalProtocol(context=2, unroll=4, trajectories=2)
    tally = ModelTally(2)
    tally.add(truth, samples, protocol, nets=_no_nets())
    tally.add_timing(_FakeRollout())
    fixed = tally.summary(official=False)["metrics"]
    assert fixed["psnr"] == pytest.approx(40.0, rel=1e-5)
    assert fixed["mse"] == pytest.approx(1e-4, rel=1e-4)
    official = tally.summary(official=True)["metrics"]
    assert official["mse"] == pytest.approx(1e-2, rel=1e-4)
    assert tally.summary(official=False)["trajectory_mean"]["mse"] == pytest.approx((1e-2 + 1e-4) / 2, rel=1e-4)


class _FakeRollout:
    first_frame_seconds = 0.5
    steady_frame_seconds = 0.1


def _no_nets():
    from scd_train.eval.evaluate import FeatureNetworks

    return FeatureNetworks()


def test_presets_match_the_paper_protocol():
    paper = build_protocol("minecraft")
    assert (paper.context, paper.unroll, paper.trajectories, paper.clips, paper.steps) == (144, 156, 4, 256, 50)
    assert not paper.official
    official = build_protocol("minecraft-official")
    assert official.official and official.frames == 300
    assert build_protocol("tiny", {"context": 3, "steps": None}).context == 3
    with pytest.raises(ConfigError, match="unknown evaluation preset 'teco'"):
        build_protocol("teco")
    with pytest.raises(ConfigError, match="eval.trajectories=0"):
        build_protocol("tiny", {"trajectories": 0})


def test_official_round_trip_is_lossy_but_close():
    truth, sample = _video(frames=4, size=32), _video(frames=4, size=32, seed=1)
    t2, s2 = official_round_trip(truth, sample, crf=25)
    assert t2.shape == truth.shape and s2.shape == sample.shape
    err = float(per_frame_mse(s2, sample).mean())
    assert 0 < err < float(per_frame_mse(truth, sample).mean())


def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 4, generator=g, dtype=torch.float64)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    # same covariance, means 2 apart in every dimension: distance = 4 * 4
    assert frechet_distance(feats, feats + 2.0) == pytest.approx(16.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 videos"):
        frechet_distance(feats[:1], feats)


def test_missing_feature_weights_name_the_file(tmp_path):
    missing = tmp_path / "alexnet-owt-7be5be79.pth"
    with pytest.raises(FileNotFoundError, match="LPIPS backbone weights.*alexnet-owt-7be5be79.pth"):
        LPIPS(missing)
    with pytest.raises(FileNotFoundError, match="FVD feature network.*i3d.pt"):
        VideoFeatures(tmp_path / "i3d.pt")


def test_lpips_from_a_local_backbone_file(tmp_path):
    from torchmetrics.functional.image.lpips import _get_tv_model_features

    torch.manual_seed(0)
    features = _get_tv_model_features("alexnet", pretrained=False)
    path = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    metric = LPIPS(path)
    a, b = _video(frames=3, size=64), _video(frames=3, size=64, seed=5)
    assert torch.allclose(metric(a, a.clone()), torch.zeros(3), atol=1e-6)
    dist = metric(a, b)
    assert dist.shape == (3,) and (dist > 0).all()
    small_a, small_b = _video(frames=2, size=16), _video(frames=2, size=16, seed=2)  # enlarged internally
    assert (metric(small_a, small_b) > 0).all()
    official = LPIPS(path, official_range=True)(a, b)
    assert not torch.allclose(official, dist)  # [0, 1] inputs without rescaling give other values
    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="wrong.pth lacks LPIPS backbone entries"):
        LPIPS(tmp_path / "wrong.pth")


class _TinyI3D(torch.nn.Module):
    """Same calling convention as the StyleGAN-V I3D TorchScript."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                return_features: bool = True) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3, 4))  # (B, 3)
        return self.proj(pooled)


def test_fvd_features_from_a_torchscript_file(tmp_path):
    path = tmp_path / "i3d.pt"
    torch.jit.save(torch.jit.script(_TinyI3D()), str(path))
    net = VideoFeatures(path)
    videos = torch.rand(5, 6, 3, 16, 16)
    feats = net(videos)
    assert feats.shape == (5, 8) and feats.dtype == torch.float64
    brighter = net((videos + 0.3).clamp(0, 1))
    assert frechet_distance(feats, feats) < 1e-6 < frechet_distance(feats, brighter)
