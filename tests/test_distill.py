"""``scd-distill`` end to end on a tiny teacher: the student learns, beats the teacher at one step,
resumes exactly, and is an ordinary run for scd-sample, scd-export and the streaming API; every
kind of bad input is one clear line naming the value."""

from __future__ import annotations

import json

import pytest
import torch

from scd_train import distill, sample, weights
from scd_train.config import load_config
from scd_train.diffusion.sampling import generate, settings_from_config
from scd_train.eval.next_frame import next_frame_score
from scd_train.models import build_model
from scd_train.trainer import Trainer

SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2", "model.max_frames=16",
         "data.synthetic.num_videos=64", "data.synthetic.frames_per_video=8", "data.clip_frames=4",
         "data.clip_stride=2", "data.batch_size=8", "log.progress_bar=false", "log.wandb=disabled",
         "optim.warmup_steps=10", "optim.lr=2e-3", "optim.ema_decay=0.9", "train.checkpoint_every=0"]
# the student's run: short, logged every step
DISTILL = ["log.every=5", "train.checkpoint_every=0", "optim.warmup_steps=5", "log.progress_bar=false",
           "log.wandb=disabled"]


def train_teacher(run_dir, *overrides) -> None:
    cfg = load_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={run_dir}", "diffusion.sample_steps=8",
                                            *overrides])
    Trainer(cfg).run()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher whose timestep density leans toward low noise (logit mean 1), as teachers tuned for
    many-step sampling do: its velocity at pure noise is its least trained, so its own one-step
    sample is poor. That is the case a one-step student exists for."""
    run = tmp_path_factory.mktemp("teacher") / "scd"
    train_teacher(run, "train.steps=200", "diffusion.logit_mean=1.0")
    return run


@pytest.fixture(scope="module")
def one_step_student(teacher):
    out = teacher.parent / "student-k1"
    assert distill.main([str(teacher), "--steps", "1", "--out", str(out), *DISTILL, "train.steps=60"]) == 0
    return out


def logged(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_one_step_student_learns_and_beats_the_one_step_teacher(teacher, one_step_student):
    records = logged(one_step_student)
    losses = [records[s]["loss"] for s in sorted(records)]
    assert sorted(records) == list(range(5, 61, 5))
    assert losses[-1] < 0.5 * losses[0]
    teacher_model, teacher_cfg = weights.load_model(teacher)
    student_model, student_cfg = weights.load_model(one_step_student)
    at_one = next_frame_score(teacher_model, teacher_cfg, clips=8, context=3, steps=1)
    student = next_frame_score(student_model, student_cfg, clips=8, context=3, steps=None)
    assert student.clips == at_one.clips == 8
    assert student.model_psnr > at_one.model_psnr + 0.5, (student, at_one)


@pytest.mark.slow
def test_the_student_run_records_its_teacher_and_samples_like_any_run(teacher, one_step_student, tmp_path):
    cfg = load_config(one_step_student / "config.yaml")
    assert (cfg.diffusion.sample_steps, cfg.diffusion.sample_schedule, cfg.diffusion.cfg_scale) == (1, "uniform", 1.0)
    d = cfg.distill
    assert d.method == "trajectory" and d.teacher == str(teacher.resolve()) and d.teacher_steps == 8
    assert d.teacher_checkpoint == str((teacher / "checkpoints" / "step_00000200").resolve())
    record = json.loads((one_step_student / "teacher.json").read_text())
    assert record["teacher"]["checkpoint_step"] == 200 and record["teacher_substeps_per_student_step"] == 8
    # scd-sample picks up the student's one step by default
    out = tmp_path / "samples"
    assert sample.main([str(one_step_student), "--clips", "2", "--context", "2", "--unroll", "3",
                        "--out", str(out)]) == 0
    assert len(list(out.glob("*.mp4"))) == 2
    # scd-eval: the student at its one step beside the teacher at its eight
    from scd_train.eval import cli as eval_cli

    assert eval_cli.main(["--scd", str(one_step_student), "--baseline", str(teacher), "--clips", "2", "--context", "2",
                          "--unroll", "2", "--trajectories", "1", "--sheet-clips", "0", "--wandb", "disabled",
                          "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert evaluated["scd"]["sampler"]["steps"] == 1 and evaluated["scd"]["sampler"]["schedule"] == "uniform"
    assert evaluated["baseline"]["sampler"]["steps"] == 8
    # the streaming API: one decoder call per generated frame; an export reloads the same weights
    model, cfg = weights.load_model(one_step_student)
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    context = torch.randn(1, 2, cfg.model.latent_channels, 8, 8)
    rollout = generate(model, context, torch.zeros(1, 6, dtype=torch.long), 4, settings_from_config(cfg.diffusion))
    assert len(calls) == 4 and rollout.counts.denoise == 4
    export = tmp_path / "student.safetensors"
    assert weights.main([str(one_step_student), "--out", str(export)]) == 0
    exported, exported_cfg = weights.load_model(export)
    assert exported_cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), exported.state_dict().values()))
    # the frozen encoder is the teacher's (it has no EMA shadow of its own)
    teacher_model, _ = weights.load_model(teacher)
    assert torch.equal(model.encoder.blocks[0].qkv.weight, teacher_model.encoder.blocks[0].qkv.weight)
    assert not torch.equal(model.decoder.proj_out.weight, teacher_model.decoder.proj_out.weight)


@pytest.mark.slow
def test_self_rollout_distillation_resumes_exactly(teacher, tmp_path):
    common = [str(teacher), "--steps", "2", *DISTILL, "log.every=1", "distill.self_rollout=true",
              "distill.rollout_context_frames=2"]
    assert distill.main([*common, "--out", str(tmp_path / "straight"), "train.steps=4"]) == 0
    assert distill.main([*common, "--out", str(tmp_path / "resumed"), "train.steps=2"]) == 0
    assert distill.main([*common, "--out", str(tmp_path / "resumed"), "train.steps=4"]) == 0
    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    assert [straight[s]["loss"] for s in range(1, 5)] == [resumed[s]["loss"] for s in range(1, 5)]
    ckpt = "checkpoints/step_00000004"
    for use_ema in (True, False):
        model = build_model(load_config(tmp_path / "straight" / "config.yaml").model)
        a = weights.read_checkpoint_weights(tmp_path / "straight" / ckpt, model, use_ema)
        b = weights.read_checkpoint_weights(tmp_path / "resumed" / ckpt, model, use_ema)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_dense_baseline_distils_the_same_way(tmp_path):
    dense = tmp_path / "dense"
    train_teacher(dense, "model.arch=causal_dit", "train.steps=10")
    args = [str(dense), "--steps", "2", "--out", str(tmp_path / "dense-k2"), *DISTILL, "train.steps=6"]
    assert distill.main(args) == 2  # refused without --baseline
    assert distill.main([*args, "--baseline"]) == 0
    model, cfg = weights.load_model(tmp_path / "dense-k2")
    assert cfg.model.arch == "causal_dit" and cfg.diffusion.sample_steps == 2
    context = torch.randn(1, 2, cfg.model.latent_channels, 8, 8)
    rollout = generate(model, context, None, 3, settings_from_config(cfg.diffusion))
    assert rollout.counts.denoise == 6


# -- bad input: one line on stderr naming the value, exit status 2 -----------------------------------


def refused(capsys, *argv) -> str:
    capsys.readouterr()  # what came before (an in-process teacher's training log) is not this command's
    assert distill.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scd-distill: ") and err.count("\n") == 1, err
    return err


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    err = refused(capsys, tmp_path, "--steps", "2")
    assert str(tmp_path) in err and "no config.yaml" in err
    err = refused(capsys, tmp_path / "missing", "--steps", "2")
    assert "does not exist" in err


@pytest.mark.slow
def test_bad_teachers_and_student_settings_are_refused(teacher, tmp_path, capsys):
    out = ["--out", str(tmp_path / "s")]
    err = refused(capsys, teacher, "--steps", "9", *out)
    assert "--steps 9" in err and "8 steps" in err
    err = refused(capsys, teacher, "--steps", "2", "--teacher-steps", "1", *out)
    assert "--steps 2" in err and "1 steps" in err
    err = refused(capsys, teacher, "--steps", "2", "model.decoder_layers=2", *out)
    assert "model.decoder_layers=2" in err and "model.decoder_layers=1" in err
    err = refused(capsys, teacher, "--steps", "2", "model.width=128", "model.num_heads=4", *out)
    assert "model.width=128" in err
    err = refused(capsys, teacher, "--steps", "2", "diffusion.sample_steps=3", *out)
    assert "diffusion.sample_steps" in err and "--steps" in err
    err = refused(capsys, teacher, "--steps", "2", "--baseline", *out)
    assert "model.arch='scd'" in err
    err = refused(capsys, teacher, "--steps", "2", "--out", teacher)
    assert "teacher itself" in err
    raw = tmp_path / "raw.safetensors"
    assert weights.main([str(teacher), "--raw", "--out", str(raw)]) == 0
    err = refused(capsys, raw, "--steps", "2", *out)
    assert str(raw) in err and "not the EMA" in err
    ordinary = tmp_path / "ordinary"
    train_teacher(ordinary, "train.steps=1")
    err = refused(capsys, teacher, "--steps", "2", "--out", ordinary)
    assert "ordinary training run" in err


@pytest.mark.slow
def test_a_run_directory_holding_another_distillation_is_not_mixed(teacher, one_step_student, capsys):
    err = refused(capsys, teacher, "--steps", "2", "--out", one_step_student)
    assert "diffusion.sample_steps=1" in err and str(one_step_student) in err
    err = refused(capsys, teacher, "--steps", "1", "--out", one_step_student, "distill.self_rollout=true")
    assert "distill.self_rollout=False" in err
    # a change the resume policy refuses points to a new distillation, not to train.init_from (which
    # scd-distill does not take: its student always starts from the teacher)
    capsys.readouterr()
    assert distill.main([str(teacher), "--steps", "1", "--out", str(one_step_student), "data.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size: 8 (checkpoint) -> 4 (now)" in err
    assert "another --out" in err and "train.init_from" not in err


def test_a_checkpoint_without_ema_is_refused(tmp_path, capsys):
    """A run whose checkpoint holds model weights but no EMA (written by some other tool)."""
    import torch.distributed.checkpoint as dcp

    from scd_train.config import dump_yaml

    run = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", SMALL)
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    dump_yaml(cfg, run / "config.yaml")
    dcp.save({"model": build_model(cfg.model).state_dict()}, checkpoint_id=str(ckpt / "state"))
    from scd_train.checkpoint_integrity import digest_files, list_files

    # an intact checkpoint (with its file manifest), so the only thing wrong is the missing EMA
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1,
                                               "files": digest_files(ckpt, list_files(ckpt))}))
    err = refused(capsys, run, "--steps", "2")
    assert str(ckpt) in err and "no EMA" in err
