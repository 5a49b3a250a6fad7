"""The side-by-side speed method: same work in the timed prefill as in the streams, interleaved
phases, ratios from the recorded times, FLOP ratios beside them, threads pinned, load recorded."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from scd_train.config import load_config
from scd_train.eval.speed import SpeedSettings, TimedModel, measure, paired_configs, pinned_threads
from scd_train.models import build_model

TINY = ["model.encoder_layers=2", "model.decoder_layers=1", "model.max_frames=16"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml", TINY)


@pytest.mark.parametrize("guided", [False, True])
def test_timed_prefill_does_the_context_pass_the_stream_does(cfg, guided):
    settings = SpeedSettings(context=4, rollouts=1, unroll=2, steps=2, guided=guided)
    torch.manual_seed(0)
    for model_cfg in paired_configs(cfg):
        model = build_model(model_cfg.model).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        m = model_cfg.model
        context = torch.randn(1, 4, m.latent_channels, m.latent_height, m.latent_width)
        timed = TimedModel(model, model_cfg, settings, context, torch.randint(0, 4, (1, 6)), torch.float32)
        cache = timed.prefill_pass()
        timed.first_frame()
        stream_cache = timed.stream.cache
        tokens = 4 * model.tokens_per_frame if m.arch == "causal_dit" else 4 * model.encoder.tokens_per_frame
        assert cache.length == tokens
        assert cache.keys.shape[1] == stream_cache.keys.shape[1]  # the same batch (doubled for null actions)
        assert torch.allclose(cache.keys[:, :, :, :tokens], stream_cache.keys[:, :, :, :tokens], atol=1e-6)
        assert torch.allclose(cache.values[:, :, :, :tokens], stream_cache.values[:, :, :, :tokens], atol=1e-6)


def test_measure_times_every_phase_of_both_models_and_derives_the_ratios(cfg):
    settings = SpeedSettings(context=3, rollouts=2, unroll=3, steps=2)
    report = measure(cfg, [settings], torch.device("cpu"), torch.float32, threads=1)
    assert report["threads"] == 1 and "clean context" in report["history"]
    assert set(report["machine_load"]) == {"before", "after"}
    row = report["results"][0]
    for name in ("scd", "causal_dit"):
        assert row[name]["prefill"]["calls"] == row[name]["first_frame"]["calls"] == 2
        assert row[name]["frame"]["calls"] == settings.steady_frames == 4
        assert row[name]["calls_per_frame"] == {"context": 1.0, "denoise": 2.0}
        assert row[name]["frame"]["wall_s_min"] <= row[name]["frame"]["wall_s_median"]
    for phase in ("prefill", "first_frame", "frame"):
        ratio, scd, dense = row["ratios"][phase], row["scd"][phase], row["causal_dit"][phase]
        assert ratio["wall_median"] == pytest.approx(dense["wall_s_median"] / scd["wall_s_median"])
        assert ratio["wall_min"] == pytest.approx(dense["wall_s_min"] / scd["wall_s_min"])
        assert ratio["cpu_median"] == pytest.approx(dense["cpu_s_median"] / scd["cpu_s_median"])
        assert ratio["flops"] > 1.0  # the dense model has more layers at every phase
    flops = row["scd"]["gflops"]
    assert flops["first_frame"] == pytest.approx(flops["prefill"] + flops["frame"]["denoise"], rel=1e-6)


def test_pinned_threads_apply_to_cpu_and_are_restored():
    before = torch.get_num_threads()
    with pinned_threads(1, torch.device("cpu")) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_bench_inference_writes_the_method_into_its_json(tmp_path, repo_root):
    spec = importlib.util.spec_from_file_location("bench_inference", repo_root / "bench" / "inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "inference.json"
    assert bench.main(["--contexts", "2", "--rollouts", "1", "--unroll", "2", "--steps", "1", "--threads", "1",
                       "--out", str(out), "model.width=64", "model.num_heads=1", "model.head_dim=64",
                       "model.encoder_layers=1", "model.decoder_layers=1"]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python bench/inference.py --contexts 2")
    assert report["threads"] == 1 and report["model"]["dense_layers"] == 2
    assert report["settings"]["steady_frames_per_model"] == 1
    row = report["results"][0]
    assert set(row["ratios"]) == {"prefill", "first_frame", "frame"}
    assert all("flops" in r for r in row["ratios"].values())


def test_demo_prints_the_side_by_side_ratio_with_cpu_time_and_flops(capsys):
    from scd_train.demo import SPEED_THREADS, measure_speed_ratio, print_table

    small = load_config("configs/tiny.yaml", [*TINY, "diffusion.sample_steps=1"])
    speed = measure_speed_ratio(small, context=2)
    assert speed["threads"] == SPEED_THREADS and "machine_load" in speed and "history" in speed
    ratio = speed["ratios"]["frame"]
    print_table({"steps": 1, "loss_initial": 1.0, "loss_final": 0.5, "run_dir": "runs/x", "speed": speed,
                 "next_frame": {"clips": 2, "model_psnr": 30.0, "copy_last_psnr": 24.0}})
    out = capsys.readouterr().out
    assert f"{ratio['wall_median']:.2f}x | {ratio['cpu_median']:.2f}x" in out
    assert f"{ratio['flops']:.2f}x" in out and "median of 21" in out


def test_rollout_first_frame_includes_the_prefill_for_both_models(cfg):
    from scd_train.diffusion.sampling import SamplerSettings, generate

    for model_cfg in paired_configs(cfg):
        model = build_model(model_cfg.model).eval()
        m = model_cfg.model
        context = torch.randn(1, 3, m.latent_channels, m.latent_height, m.latent_width)
        rollout = generate(model, context, None, 2, SamplerSettings(steps=1))
        assert 0 < rollout.prefill_seconds < rollout.first_frame_seconds
        assert rollout.first_frame_seconds == pytest.approx(rollout.prefill_seconds + rollout.frame_seconds[0])
