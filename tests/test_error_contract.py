"""The error contract of every command (scd_train.cli): exit codes, rank-0-only printing, the
--debug / SCD_DEBUG switch, warnings, real bugs keeping their traceback; and inputs that used to be
accepted without a word (YAML exponents, ignored settings, mixed frame rates, float16 VAE weights)."""

from __future__ import annotations

import configparser
import importlib
import json
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from scd_train import cli, train
from scd_train.checkpoint import CheckpointManager
from scd_train.config import load_config
from scd_train.data.shard_readers import CorruptSampleError
from scd_train.errors import InputError, ResumeError, RunFailure, ScdWarning

TINY = ["--config", "configs/tiny.yaml", "log.progress_bar=false", "log.wandb=disabled"]


# -- the handler ----------------------------------------------------------------------------------

def test_exit_codes_follow_the_error_family(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def failing(exc):
        def main(argv):
            raise exc
        return main

    assert cli.run_cli("tool", failing(InputError("bad value x=3")), []) == 2
    assert capsys.readouterr().err == "tool: bad value x=3\n"
    assert cli.run_cli("tool", failing(RunFailure("lost a peer")), []) == 1
    assert capsys.readouterr().err == "tool: lost a peer\n"


def test_a_bug_keeps_its_traceback():
    def main(argv):
        return 1 // 0

    with pytest.raises(ZeroDivisionError):
        cli.run_cli("tool", main, [])


def test_debug_flag_is_removed_before_parsing(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    seen = []

    def main(argv):
        seen.append(argv)
        raise InputError("nope")

    assert cli.run_cli("tool", main, ["a", "--debug", "b", "--", "--debug"]) == 2
    assert seen == [["a", "b", "--", "--debug"]]
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("tool: nope")


def test_only_rank_zero_prints_unless_the_error_is_rank_local(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cli.report("tool", InputError("same on every rank"))
    assert capsys.readouterr().err == ""
    cli.report("tool", CorruptSampleError("corrupt data in shard s.tar, member k.latents.npy: truncated"))
    assert capsys.readouterr().err == "tool: rank 1: corrupt data in shard s.tar, member k.latents.npy: truncated\n"
    monkeypatch.setenv("RANK", "0")
    cli.report("tool", InputError("same on every rank"))
    assert capsys.readouterr().err == "tool: same on every rank\n"


def test_user_warnings_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def main(argv):
        warnings.warn("setting x has no effect", ScdWarning, stacklevel=1)
        return 0

    assert cli.run_cli("tool", main, []) == 0
    assert capsys.readouterr().err == "tool: warning: setting x has no effect\n"


# -- processes ------------------------------------------------------------------------------------

def test_debug_switches_show_the_traceback(subprocess_env, python_exe, repo_root):
    args = [python_exe, "-m", "scd_train.train", *TINY, "optim.lr=abc"]
    plain = subprocess.run(args, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        "scd-train: command-line override 'optim.lr=abc': optim.lr='abc': expected a number"]
    for extra_args, extra_env in ((["--debug"], {}), ([], {"SCD_DEBUG": "1"})):
        run = subprocess.run(args + extra_args, cwd=repo_root, env={**subprocess_env, **extra_env},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 2
        assert "Traceback (most recent call last)" in run.stderr and "ConfigError" in run.stderr
        assert run.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_print_one_message(subprocess_env, python_exe, repo_root, tmp_path):
    """Under torchrun the error comes after the process group exists (1 clip cannot feed 2 ranks): both
    ranks fail with exit code 2 and the message appears once."""
    args = [python_exe, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "scd_train.train", *TINY, "train.backend=ddp", "train.device=cpu", "model.width=64", "model.num_heads=2",
            "model.encoder_layers=1", "model.decoder_layers=1", "data.synthetic.num_videos=8",
            "data.synthetic.frames_per_video=8", "data.clip_frames=8", "data.batch_size=4",
            f"train.run_dir={tmp_path / 'run'}"]
    run = subprocess.run(args, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    ours = [line for line in (run.stdout + run.stderr).splitlines() if "scd-train:" in line]
    assert len(ours) == 1, run.stderr
    assert ours[0].endswith("7 clips cannot fill one batch of data.batch_size=4 on each of 2 rank(s) (world size "
                            "detected); lower data.batch_size or add data")
    assert "exitcode  : 2" in run.stderr  # torchrun's summary of the failed rank
    assert not (tmp_path / "run").exists()  # the failed start left no run directory


def test_a_config_error_is_printed_by_rank_zero_only(subprocess_env, python_exe, repo_root):
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**subprocess_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([python_exe, "-m", "scd_train.train", *TINY, "optim.decoder_lr_ration=2"],
                                      cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [2, 2]
    assert "did you mean 'optim.decoder_lr_ratio'" in results[0][2]
    assert results[1][1] == results[1][2] == ""


# -- accepted silently before ---------------------------------------------------------------------

def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  eps: 1e-8\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-8
    assert load_config(path, ['optim.lr="2e-4"']).optim.lr == 2e-4  # a quoted value from a sweep file


def test_ignored_settings_of_the_dense_baseline_are_warned(capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    from launchers import slurm

    args = ["--config", "configs/tiny.yaml", "--dry-run", "--nodes", "1", "--gpus-per-node", "0", "--backend",
            "ddp", "model.arch=causal_dit", "optim.decoder_lr_ratio=3", "optim.freeze_encoder_after=10"]
    assert slurm.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert ("launchers/slurm.py: warning: optim.decoder_lr_ratio=3.0 has no effect on model.arch='causal_dit': the "
            "dense baseline has one parameter group ('model') trained at optim.lr") in err
    assert any(line.startswith("launchers/slurm.py: warning: optim.freeze_encoder_after=10") for line in err)


def test_zero3_resume_at_another_world_size_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"world_size": 4, "step": 10}))

    class Local:
        is_main, world_size, rank = True, 2, 0

        def barrier(self) -> None: ...

    class ZeroThree:
        name, supports_reshard = "deepspeed", False

    with pytest.raises(ResumeError, match=r"written by 4 ranks but this run has 2; train.backend='deepspeed' "
                                          r"cannot reshard it: resume with 4 ranks"):
        CheckpointManager(tmp_path / "checkpoints", keep=1, runtime=Local()).load(checkpoint, ZeroThree(), None)


def test_nonfinite_loss_exits_with_code_one(tmp_path, capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    from scd_train.diffusion import objective

    build = objective.build_objective

    def poisoned_build(*args):
        inner = build(*args)

        class Poisoned:
            def __call__(self, model, latents, actions):
                out = inner(model, latents, actions)
                out.loss = out.loss * float("nan")
                return out

        return Poisoned()

    monkeypatch.setattr("scd_train.trainer.build_objective", poisoned_build)
    code = train.main([*TINY, "model.width=64", "model.num_heads=2", "model.encoder_layers=1",
                       "model.decoder_layers=1", "data.synthetic.num_videos=8", "data.synthetic.frames_per_video=8",
                       "data.clip_frames=4", "data.batch_size=2", "train.steps=2", f"train.run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("scd-train: ")]
    assert len(line) == 1 and line[0].startswith("scd-train: non-finite loss or gradient norm at step 0, rank 0: "
                                                 "loss=nan")
    assert not list((tmp_path / "r").glob("checkpoints/step_*"))


def _videos_at(folder: Path, rates: dict[str, int]) -> Path:
    from scd_train.video import write_mp4

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, fps in rates.items():
        write_mp4(rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), folder / name, fps)
    return folder


def test_mixed_frame_rates_are_resampled_to_one_and_recorded(tmp_path):
    from shard_helpers import encode_options, save_random_vae

    from data_prep.encode import encode
    from scd_train.data.manifest import load_manifest
    from scd_train.data.shard_readers import open_shards

    videos = _videos_at(tmp_path / "videos", {"a.mp4": 8, "b.mp4": 16})
    vae = save_random_vae(tmp_path / "vae")
    summary = encode(encode_options(videos, tmp_path / "out", vae, formats=["webdataset"], num_actions=None,
                                    resample_fps=8.0))
    manifest = load_manifest(summary.manifest.parent)
    video = manifest.raw["video"]
    assert video["fps"] == [8.0] and video["source_fps"] == [8.0, 16.0] and video["resample_fps"] == 8.0
    metas = [r.read(i).meta for r in open_shards(manifest, "webdataset") for i in range(len(r))]
    # 12 frames at 16 fps last as long as 6 at 8 fps: (6 - 4) // 2 + 1 = 2 clips; at 8 fps (12 - 4) // 2 + 1 = 5
    assert sorted((m["video"], m["fps"], m["source_fps"]) for m in metas) == (
        [("a.mp4", 8.0, 8.0)] * 5 + [("b.mp4", 8.0, 16.0)] * 2)


def test_float16_vae_weights_run_in_float32_and_are_recorded(tmp_path):
    from shard_helpers import save_random_vae

    from scd_train.data.vae import diffusers_class, encode_pixels, load_vae, vae_info

    full = save_random_vae(tmp_path / "fp32")
    half = tmp_path / "fp16"
    diffusers_class("AutoencoderKL").from_pretrained(str(full)).to(torch.float16).save_pretrained(str(half))
    assert vae_info(full).weights_dtype == "float32" and vae_info(half).weights_dtype == "float16"
    assert vae_info(full).weights_sha256 != vae_info(half).weights_sha256
    model = load_vae(half)
    assert next(model.parameters()).dtype == torch.float32
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isfinite(encode_pixels(model, pixels)).all()
    with pytest.raises(InputError, match="float16 VAE arithmetic"):
        load_vae(half, dtype=torch.float16)


def test_every_console_script_goes_through_the_handler(repo_root):
    """Each entry point is wrapped by ``scd_train.cli.command`` (it has ``__wrapped__``) or calls ``run_cli``."""
    parser = configparser.ConfigParser()
    parser.read(repo_root / "setup.cfg")
    entries = parser["options.entry_points"]["console_scripts"].splitlines()
    targets = [line.split("=", 1)[1].strip() for line in entries if "=" in line]
    for target in [*targets, "launchers.slurm:main"]:
        module, name = target.split(":")
        main = getattr(importlib.import_module(module), name)
        assert hasattr(main, "__wrapped__") or "run_cli(" in Path(sys.modules[module].__file__).read_text(), target
