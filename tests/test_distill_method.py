"""The distillation objective's targets, on untrained models with random weights (no training).

What the student regresses must be exactly what the teacher's own streaming sampler computes
over the same noise interval; a student identical to its teacher at the teacher's step count has
nothing to learn; the few-step schedule reaches every sampler.
"""

import copy
import dataclasses

import pytest
import torch

from scd_train.config import load_config
from scd_train.diffusion.distill import (
    DistillationPair,
    DistillObjective,
    Guidance,
    SCDTeacher,
    _decoder_velocity,
    _dense_velocity,
    build_method,
    teacher_substeps,
)
from scd_train.diffusion.objective import next_frame_actions
from scd_train.diffusion.sampling import SamplerSettings, euler_sigmas, new_stream, sample_sigmas, settings_from_config
from scd_train.models import build_model

SMALL = ["model.width=32", "model.num_heads=2", "model.head_dim=16", "model.rope_axes=[4,6,6]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2", "data.clip_frames=4",
         "data.batch_size=2", "diffusion.sample_schedule=uniform"]


def distill_cfg(arch="scd", steps=4, teacher_steps=8, *extra):
    cfg = load_config("configs/tiny.yaml", [*SMALL, f"model.arch={arch}", f"diffusion.sample_steps={steps}",
                                            "distill.teacher=t", f"distill.teacher_steps={teacher_steps}", *extra])
    return cfg


def random_model(cfg, seed=0):
    """A model whose zero-initialized output layers are perturbed, so it predicts something."""
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_pair(cfg, teacher):
    student = copy.deepcopy(teacher)
    if cfg.model.arch == "causal_dit":
        return DistillationPair(student, teacher, build_method(cfg))
    student.encoder.requires_grad_(False)
    return DistillationPair(student, SCDTeacher(teacher.decoder), build_method(cfg))


def clip(cfg, batch=2, frames=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    latents = torch.randn(batch, frames, m.latent_channels, m.latent_height, m.latent_width, generator=g)
    return latents, torch.randint(0, m.num_actions, (batch, frames), generator=g)


@pytest.mark.parametrize("arch", ["scd", "causal_dit"])
def test_a_student_equal_to_its_teacher_at_the_teachers_steps_has_nothing_to_learn(arch):
    cfg = distill_cfg(arch, steps=4, teacher_steps=4)  # one teacher sub-step per student step
    pair = make_pair(cfg, random_model(cfg))
    latents, actions = clip(cfg)
    loss = DistillObjective()(pair, latents, actions).loss.detach()
    assert float(loss) < 1e-10
    fewer = distill_cfg(arch, steps=2, teacher_steps=8)  # now a student step spans 4 teacher steps
    pair = make_pair(fewer, random_model(fewer))
    assert float(DistillObjective()(pair, latents, actions).loss) > 1e-6


def test_the_pair_keeps_the_students_names_and_freezes_teacher_and_encoder():
    cfg = distill_cfg()
    teacher = random_model(cfg)
    pair = make_pair(cfg, teacher)
    names = {n for n, _ in pair.named_parameters()}
    student_names = {n for n, _ in teacher.named_parameters()}
    assert student_names <= names and all(n.startswith("teacher.") for n in names - student_names)
    trainable = {n for n, p in pair.named_parameters() if p.requires_grad}
    assert trainable == {n for n in student_names if n.startswith("decoder.")}
    pair.train()
    assert not any(m.training for m in pair.modules())  # no action dropout, no context noise


def scd_context(encoder, latents, actions, frame):
    """The decoder context for ``frame``: the encoder output of the frame before it."""
    method = build_method(distill_cfg())
    return method._contexts(encoder, latents, next_frame_actions(actions), [frame], guide=False)[0][:, 0]


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_scd_one_step_target_is_the_teachers_own_sampler_output(cfg_scale):
    """K=1: the target from pure noise is (teacher sample - noise) / (0 - 1), where the sample is
    what SCDStream draws with the teacher's N steps from the same noise and context."""
    n = 6
    cfg = distill_cfg("scd", 1, n, f"distill.teacher_cfg_scale={cfg_scale}", "distill.teacher_cfg_mode=action")
    teacher = random_model(cfg).eval()
    method = build_method(cfg)
    latents, actions = clip(cfg, batch=2, frames=4)
    frame = 3
    enc_actions = next_frame_actions(actions)
    context, uncond = method._contexts(teacher.encoder, latents, enc_actions, [frame], guide=True)
    shape = latents[:, frame].shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    velocity = _decoder_velocity(teacher.decoder, context[:, 0], None if uncond is None else uncond[:, 0],
                                 actions[:, frame], method.guidance)
    with torch.no_grad():
        end = method.integrate(velocity, noise, torch.ones(2), torch.zeros(2))
    settings = SamplerSettings(steps=n, cfg_scale=cfg_scale, cfg_mode="action", schedule="uniform")
    stream = new_stream(teacher, settings, 2, 4, torch.Generator().manual_seed(5))
    stream.prefill(latents[:, :frame], actions[:, :frame])
    sampled = stream.next_frame(actions[:, frame])
    assert torch.allclose(end, sampled, atol=1e-5)


def test_dense_one_step_target_is_the_teachers_own_sampler_output():
    n = 5
    cfg = distill_cfg("causal_dit", 1, n)
    teacher = random_model(cfg).eval()
    method = build_method(cfg)
    latents, actions = clip(cfg, batch=2, frames=4)
    frame = torch.tensor([2, 2])
    noise = torch.randn(latents[:, 2].shape, generator=torch.Generator().manual_seed(3))
    clips = latents.clone()
    clips[:, 3] = torch.randn_like(clips[:, 3])  # frames after the target cannot matter
    velocity = _dense_velocity(teacher, clips, actions, frame, Guidance())
    with torch.no_grad():
        end = method.integrate(velocity, noise, torch.ones(2), torch.zeros(2))
    stream = new_stream(teacher, SamplerSettings(steps=n, schedule="uniform"), 2, 3, torch.Generator().manual_seed(3))
    stream.prefill(latents[:, :2], actions[:, :2])
    assert torch.allclose(end, stream.next_frame(actions[:, 2]), atol=1e-5)


def test_each_student_step_regresses_the_teachers_mean_velocity_over_its_interval():
    cfg = distill_cfg("scd", 2, 8)
    assert teacher_substeps(8, 2) == 4 and teacher_substeps(20, 3) == 7
    teacher = random_model(cfg)
    pair = make_pair(cfg, teacher)
    latents, actions = clip(cfg)
    torch.manual_seed(0)
    prediction, target, mask = pair(latents, actions)
    draws, batch, window = cfg.diffusion.decoder_multi_batch, 2, 3
    assert prediction.shape == target.shape == (draws * batch * window, *latents.shape[2:])
    assert mask.shape == (draws * batch, window) and bool(mask.all())
    assert prediction.requires_grad and not target.requires_grad
    # the untrained student already predicts the teacher's instantaneous velocity; the target differs
    # from it by the path's curvature, which is small next to the velocity itself
    err = (prediction - target).pow(2).mean() / target.pow(2).mean()
    assert 0 < float(err) < 0.5


def test_uniform_schedule_reaches_every_sampler_consumer():
    assert torch.allclose(sample_sigmas(4, "uniform"), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.equal(sample_sigmas(4, "release"), euler_sigmas(4))
    cfg = distill_cfg("scd", 4, 8)
    settings = settings_from_config(cfg.diffusion)
    assert (settings.steps, settings.schedule, settings.cfg_scale) == (4, "uniform", 1.0)
    assert settings_from_config(cfg.diffusion, steps=2).steps == 2
    from scd_train.eval.evaluate import sampler_settings
    from scd_train.eval.protocol import build_protocol

    assert sampler_settings(cfg, build_protocol("tiny", {})).schedule == "uniform"
    model = random_model(dataclasses.replace(cfg)).eval()
    seen = []
    conditioning = model.decoder.step_conditioning

    def recorded(timesteps, actions):  # the sampler conditions all of a frame's steps at once: (T, B)
        seen.extend(float(t) for t in timesteps[:, 0])
        return conditioning(timesteps, actions)

    model.decoder.step_conditioning = recorded
    stream = new_stream(model, settings, 1, 4)
    stream.prefill(clip(cfg, 1, 2)[0])
    stream.next_frame(torch.tensor([1]))
    assert seen == [1000.0, 750.0, 500.0, 250.0]


def test_a_trained_encoder_gets_gradient_and_the_teacher_keeps_its_own():
    cfg = distill_cfg("scd", 2, 4, "distill.train_encoder=true")
    teacher = random_model(cfg)
    student = copy.deepcopy(teacher)
    pair = DistillationPair(student, SCDTeacher(teacher.decoder, teacher.encoder), build_method(cfg))
    trainable = {n for n, p in pair.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.") for n in trainable) and not any(n.startswith("teacher.") for n in trainable)
    latents, actions = clip(cfg)
    DistillObjective()(pair, latents, actions).loss.backward()
    assert student.encoder.blocks[0].qkv.weight.grad is not None
    assert teacher.encoder.blocks[0].qkv.weight.grad is None


def test_decoder_guidance_reaches_the_targets():
    """At K = N an unguided student copy has loss 0; a guided teacher's targets differ from what the
    (unguided) student predicts, so the student has the guidance to learn."""
    latents, actions = clip(distill_cfg())
    for scale, zero in ((1.0, True), (3.0, False)):
        cfg = distill_cfg("scd", 4, 4, f"distill.teacher_cfg_scale={scale}", "distill.teacher_cfg_mode=decoder")
        loss = float(DistillObjective()(make_pair(cfg, random_model(cfg)), latents, actions).loss.detach())
        assert (loss < 1e-10) == zero, (scale, loss)


def test_resume_refuses_a_change_to_what_the_student_learns_and_applies_the_rest():
    """A distillation run's checkpoint continues only towards the same targets on the same grid;
    an ordinary run may still change its sampling defaults on resume."""
    from scd_train.config import Config, to_dict
    from scd_train.resume_policy import DISTILL_IDENTITY, compare_configs

    saved = Config()
    saved.distill.teacher, saved.distill.teacher_steps = "runs/teacher", 8
    saved.diffusion.sample_steps, saved.diffusion.sample_schedule = 2, "uniform"
    changed = {"distill.teacher": "runs/other", "distill.teacher_steps": 16, "diffusion.sample_steps": 4,
               "diffusion.sample_schedule": "release", "distill.train_encoder": True,
               "distill.self_rollout": True, "distill.teacher_cfg_scale": 2.0}
    assert set(changed) <= set(DISTILL_IDENTITY)
    for key, value in changed.items():
        now = to_dict(saved)
        section, name = key.split(".")
        now[section][name] = value
        refused, applied = compare_configs(to_dict(saved), now)
        assert [c.key for c in refused] == [key] and not applied, key
        assert "distillation run" in refused[0].line()
    now = to_dict(saved)
    now["distill"]["rollout_context_frames"] = 3
    refused, applied = compare_configs(to_dict(saved), now)
    assert not refused and [c.key for c in applied] == ["distill.rollout_context_frames"]
    # an ordinary run: the sampling defaults are not what it trains
    plain = to_dict(Config())
    other = to_dict(Config())
    other["diffusion"]["sample_steps"] = 4
    refused, applied = compare_configs(plain, other)
    assert not refused and [c.key for c in applied] == ["diffusion.sample_steps"]
    # an ordinary checkpoint never turns into a distillation
    other = to_dict(Config())
    other["distill"]["teacher"] = "runs/teacher"
    refused, _ = compare_configs(plain, other)
    assert [c.key for c in refused] == ["distill.teacher"]


def test_a_student_of_a_release_teacher_is_evaluated_unguided(tmp_path):
    """The release recipe evaluates at several guidance scales; the student has the guidance
    distilled in, so it keeps none of them, and they cannot be set back by an override."""
    from pathlib import Path

    from scd_train.config import load_config
    from scd_train.distill import DistillInputError, Teacher, build_student_config

    teacher_cfg = load_config("configs/tiny.yaml", ["diffusion.eval_cfg_scales=[1.5,1.0]", "diffusion.cfg_scale=1.5"])
    teacher = Teacher(Path(tmp_path / "teacher"), teacher_cfg, Path(tmp_path / "teacher" / "ckpt"), 10)
    student = build_student_config(teacher, 2, tmp_path / "student", None, [], False, None, None)
    assert student.diffusion.eval_cfg_scales is None and student.diffusion.cfg_scale == 1.0
    assert student.distill.teacher_cfg_scale == 1.5
    with pytest.raises(DistillInputError, match="diffusion.eval_cfg_scales is set by scd-distill"):
        build_student_config(teacher, 2, tmp_path / "student", None, ["diffusion.eval_cfg_scales=[1.5]"], False,
                             None, None)
