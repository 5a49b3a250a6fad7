"""scd-eval, scd-probe and scd-convert end to end on tiny runs trained here for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_OVERRIDES = ["train.steps=1", "train.checkpoint_every=1", "log.wandb=disabled", "log.progress_bar=false",
                   "data.synthetic.num_videos=32", "data.batch_size=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An SCD run and a dense-baseline run of the tiny config, one optimizer step each."""
    from scd_train.train import main as train_main

    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, arch in (("scd", "scd"), ("dense", "causal_dit")):
        run_dir = base / name
        code = train_main(["--config", str(REPO_ROOT / "configs" / "tiny.yaml"), f"model.arch={arch}",
                           f"train.run_dir={run_dir}", *TRAIN_OVERRIDES])
        assert code == 0
        out[name] = run_dir
    return out


class _TinyI3D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                return_features: bool = True) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def feature_files(tmp_path_factory) -> dict[str, Path]:
    from torchmetrics.functional.image.lpips import _get_tv_model_features

    base = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    alex = {f"features.{k}": v for k, v in _get_tv_model_features("alexnet", pretrained=False).state_dict().items()}
    torch.save(alex, base / "alexnet.pth")
    torch.jit.save(torch.jit.script(_TinyI3D()), str(base / "i3d.pt"))
    return {"lpips": base / "alexnet.pth", "fvd": base / "i3d.pt"}


SMALL_PROTOCOL = ["--clips", "3", "--batch-clips", "2", "--context", "3", "--unroll", "3", "--trajectories", "2",
                  "--steps", "2"]


def test_eval_side_by_side_with_all_metrics(runs, feature_files, tmp_path):
    from scd_train.eval.cli import main

    out = tmp_path / "eval"
    code = main(["--scd", str(runs["scd"]), "--baseline", str(runs["dense"]), *SMALL_PROTOCOL, "--sheet-clips", "2",
                 "--lpips-backbone", str(feature_files["lpips"]), "--fvd-i3d", str(feature_files["fvd"]),
                 "--wandb", "offline", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["models"]) == {"scd", "baseline"}
    assert len(result["clips"]) == 3 and result["protocol"]["compat"] == "none"
    for summary in result["models"].values():
        assert set(summary["metrics"]) == {"mse", "psnr", "ssim", "lpips", "fvd"}
        assert len(summary["per_video"]["psnr"]) == 3 and all(len(r) == 2 for r in summary["per_video"]["psnr"])
        best = [max(r) for r in summary["per_video"]["psnr"]]
        assert summary["metrics"]["psnr"] == pytest.approx(sum(best) / 3)
        assert summary["sampler"]["steps"] == 2
    assert result["models"]["baseline"]["sampler"]["cfg_mode"] == "action"
    for name in ("grid.mp4", "grid.gif", "contact_sheet.png"):
        assert (out / "samples" / name).stat().st_size > 0
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run written"


def test_eval_official_compat_mode(runs, feature_files, tmp_path):
    from scd_train.eval.cli import main

    out = tmp_path / "official"
    code = main(["--baseline", str(runs["dense"]), *SMALL_PROTOCOL, "--compat", "official", "--sheet-clips", "0",
                 "--fvd-i3d", str(feature_files["fvd"]), "--wandb", "disabled", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    summary = result["models"]["baseline"]
    assert result["protocol"]["compat"] == "official"
    assert summary["selection"]["mse"] == "max"
    worst = [max(r) for r in summary["per_video"]["mse"]]
    assert summary["metrics"]["mse"] == pytest.approx(sum(worst) / 3)
    assert len(summary["fvd_per_trajectory"]) == 2
    assert summary["metrics"]["fvd"] == pytest.approx(sum(summary["fvd_per_trajectory"]) / 2)


def test_eval_errors_name_the_problem(runs, tmp_path, capsys):
    from scd_train.eval.cli import main

    missing = tmp_path / "alexnet-owt-7be5be79.pth"
    assert main(["--scd", str(runs["scd"]), "--lpips-backbone", str(missing), "--wandb", "disabled"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["--scd", str(runs["scd"]), "--context", "20", "--unroll", "10", "--wandb", "disabled"]) == 2
    assert "frames_per_video=24" in capsys.readouterr().err
    assert main(["--wandb", "disabled"]) == 2
    assert "--scd and/or --baseline" in capsys.readouterr().err


def run_variant(run: Path, out: Path, **changes) -> Path:
    """A copy of a run directory whose recorded config differs in ``changes`` ("section__key": value)."""
    import shutil

    import yaml

    shutil.copytree(run, out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def test_eval_refuses_unlike_histories_and_runs_each_guidance_scale(runs, tmp_path, capsys):
    from scd_train.eval.cli import main

    scd = run_variant(runs["scd"], tmp_path / "scd", diffusion__eval_cfg_scales=[1.5, 1.0])
    dense = run_variant(runs["dense"], tmp_path / "dense", model__encoder_input="clean")
    args = ["--scd", str(scd), "--baseline", str(dense), *SMALL_PROTOCOL, "--clips", "2", "--trajectories", "1",
            "--unroll", "2", "--sheet-clips", "0", "--wandb", "disabled"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{scd} trained on noisy history but {dense} trained on clean history" in err
    assert "--allow-mixed-history" in err
    out = tmp_path / "eval"
    assert main([*args, "--allow-mixed-history", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["models"]) == ["scd@cfg1.5", "scd@cfg1", "baseline"]
    assert result["history"] == {"scd@cfg1.5": "noisy", "scd@cfg1": "noisy", "baseline": "clean"}
    assert [result["models"][n]["sampler"]["cfg_scale"] for n in result["models"]] == [1.5, 1.0, 1.0]
    assert result["models"]["scd@cfg1.5"]["metrics"] != result["models"]["scd@cfg1"]["metrics"]


def test_probe_cli_on_the_dense_run(runs, tmp_path, capsys):
    from scd_train.eval.probe_cli import main

    out = tmp_path / "probes"
    assert main([str(runs["dense"]), "--context", "3", "--steps", "3", "--clips", "2", "--wandb", "disabled",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "probes.json").read_text())
    assert summary["layers"] == 6 and summary["steps"] == 3 and summary["context_frames"] == 3
    shares = summary["attention_to_earlier_frames"]["mean_over_steps"]
    assert len(shares) == 6 and all(0.0 <= s <= 1.0 for s in shares)
    for name in ("feature_similarity.png", "depth_curves.png", "attention_maps.png"):
        assert (out / name).stat().st_size > 0
    assert main([str(runs["scd"]), "--wandb", "disabled"]) == 2
    assert "model.arch='causal_dit'" in capsys.readouterr().err


def test_convert_cli_and_finetune_start(runs, tmp_path):
    from safetensors.torch import load_file

    from scd_train.config import load_config
    from scd_train.convert import main
    from scd_train.trainer import Trainer

    out = tmp_path / "converted"
    assert main([str(runs["dense"]), "--encoder-layers", "4", "--decoder-layers", "0,5", "--importance-clips", "2",
                 "--out", str(out)]) == 0
    importance = json.loads((out / "layer_importance.json").read_text())
    assert len(importance["layers"]) == 6
    conversion = json.loads((out / "conversion.json").read_text())
    assert conversion["copied"]["decoder.blocks.1.qkv.weight"] == "blocks.5.qkv.weight"
    cfg = load_config(out / "finetune.yaml", ["train.steps=1", "log.wandb=disabled", "log.progress_bar=false",
                                              "data.synthetic.num_videos=32", "data.batch_size=4"])
    assert (cfg.model.arch, cfg.model.encoder_layers, cfg.model.decoder_layers) == ("scd", 4, 2)
    assert cfg.optim.warmup_steps == 500 and cfg.train.init_from == str(out / "scd_init.safetensors")
    trainer = Trainer(cfg)
    weights = load_file(cfg.train.init_from)
    for name, tensor in trainer.backend.module.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    trainer.runtime.shutdown()
