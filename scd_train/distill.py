"""``scd-distill``: turn a trained run into a few-step student with one command.

    scd-distill runs/tiny --steps 4                                # the SCD decoder learns 4-step sampling
    scd-distill runs/tiny --steps 2 distill.self_rollout=true      # trained on its own rollouts
    scd-distill runs/dense --steps 4 --baseline                    # the dense baseline, the same way
    torchrun --nproc_per_node 8 -m scd_train.distill runs/scd_m --steps 4 train.backend=fsdp2
    deepspeed --num_gpus 8 scd_train/distill.py runs/scd_m --steps 4 train.backend=deepspeed

The teacher is the run's EMA weights (its newest complete checkpoint unless --teacher-checkpoint),
sampled with --teacher-steps Euler steps (default: its diffusion.sample_steps) and its guidance.
The student starts as a copy of the teacher; by default only its decoder trains (the encoder stays
the teacher's, frozen). The student's config is the teacher's, then --config (a recipe YAML), then
dotted overrides; training runs through the ordinary trainer, so every backend, checkpointing,
exact resume, metrics.jsonl, wandb and the progress bar work as for scd-train.

The result is an ordinary run directory (default <teacher>-distill-k<K> beside the teacher) whose
config.yaml has diffusion.sample_steps=K and the "uniform" schedule, so scd-sample, scd-eval,
scd-export and the streaming API sample it in K steps by default. config.yaml's ``distill`` section
and teacher.json record the teacher (path, checkpoint, steps, guidance) and the method.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Started as a file (the deepspeed launcher does this): keep this folder's module names
    # (config, data, ...) from shadowing top-level packages.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from scd_train.cli import command  # noqa: E402
from scd_train.config import Config, ConfigError, config_from_text, from_dict, load_config, to_dict, validate  # noqa: E402
from scd_train.errors import InputError  # noqa: E402
from scd_train.resume_policy import DISTILL_IDENTITY  # noqa: E402

PROG = "scd-distill"
# Student model fields that may differ from the teacher's: they change no parameter (the attention
# window is a mask over the same weights, so a full-history teacher can give a windowed student).
FREE_MODEL_FIELDS = {"attention", "max_frames", "encoder_window", "encoder_sink_frames"}
# What makes a distillation run what it is (the resume policy's list); a run directory holding
# another one is never resumed.
IDENTITY_FIELDS = [tuple(key.split(".")) for key in sorted(DISTILL_IDENTITY)]
# Settings scd-distill owns: a dotted override of one of these is refused with the flag to use.
OWNED = {"diffusion.sample_steps": "--steps", "diffusion.cfg_scale": "distill.teacher_cfg_scale (the student "
         "samples unguided: the guidance is distilled into it)", "train.run_dir": "--out",
         "train.init_from": "the teacher (the student starts from its EMA weights)",
         "distill.teacher": "the positional teacher argument", "distill.teacher_checkpoint": "--teacher-checkpoint",
         "distill.teacher_steps": "--teacher-steps",
         "diffusion.eval_cfg_scales": "distill.teacher_cfg_scale (a student is evaluated unguided)"}


class DistillInputError(InputError):
    """Bad input to scd-distill: the message names the path, key or value."""


@dataclass
class Teacher:
    """Where the teacher's weights come from: a run's checkpoint or an EMA export."""

    source: Path
    cfg: Config
    checkpoint: Path  # a checkpoint directory, or the .safetensors file itself
    step: int | None

    @property
    def is_export(self) -> bool:
        return self.source.suffix == ".safetensors"

    def ema_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.is_export:
            from safetensors.torch import load_file

            return load_file(str(self.source))
        from scd_train.weights import read_checkpoint_weights

        return read_checkpoint_weights(self.checkpoint, model, use_ema=True)

    def record(self) -> dict:
        return {"source": str(self.source), "checkpoint": str(self.checkpoint), "checkpoint_step": self.step,
                "arch": self.cfg.model.arch, "sample_steps": self.cfg.diffusion.sample_steps,
                "sample_schedule": self.cfg.diffusion.sample_schedule, "cfg_scale": self.cfg.diffusion.cfg_scale,
                "cfg_mode": self.cfg.diffusion.cfg_mode, "config": to_dict(self.cfg)}


def resolve_teacher(source: Path, checkpoint: str | None) -> Teacher:
    """The teacher at ``source``; every way it can be unusable is an error naming the path."""
    if not source.exists():
        raise DistillInputError(f"teacher {source} does not exist (give a run directory or an EMA .safetensors)")
    if source.is_file():
        if source.suffix != ".safetensors":
            raise DistillInputError(f"teacher {source} is neither a run directory nor an exported .safetensors")
        return _export_teacher(source)
    config = source / "config.yaml"
    if not config.is_file():
        raise DistillInputError(f"teacher {source} is not a scd-train run directory (no config.yaml)")
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise DistillInputError(f"teacher {source} is not a usable scd-train run: {exc}") from None
    from scd_train.weights import resolve_checkpoint, stored_ema_names

    try:
        path = resolve_checkpoint(source, checkpoint)
    except FileNotFoundError as exc:
        raise DistillInputError(f"teacher {source}: {exc} (train it first with scd-train)") from None
    if not stored_ema_names(path):
        raise DistillInputError(f"teacher checkpoint {path} holds no EMA weights; distillation needs the teacher's "
                                "EMA (its raw weights are not the model it samples with)")
    state = json.loads((path / "trainer_state.json").read_text()) if (path / "trainer_state.json").is_file() else {}
    return Teacher(source.resolve(), cfg, path.resolve(), state.get("step"))


def _export_teacher(source: Path) -> Teacher:
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise DistillInputError(f"teacher {source} carries no 'config' metadata; export it with scd-export")
    if meta.get("weights") != "ema":
        raise DistillInputError(f"teacher {source} holds weights={meta.get('weights')!r}, not the EMA (exported with "
                                "--raw?); export the teacher without --raw")
    step = json.loads(meta["trainer_state"]).get("step") if "trainer_state" in meta else None
    return Teacher(source.resolve(), config_from_text(meta["config"]), source.resolve(), step)


def check_student_model(student: Config, teacher: Teacher) -> None:
    """The student starts from the teacher's weights: every shape-bearing model field must match."""
    for f in dataclasses.fields(student.model):
        if f.name in FREE_MODEL_FIELDS:
            continue
        mine, theirs = getattr(student.model, f.name), getattr(teacher.cfg.model, f.name)
        if mine != theirs:
            raise DistillInputError(f"model.{f.name}={mine!r} does not match the teacher's model.{f.name}={theirs!r} "
                                    f"({teacher.source}); the student starts from the teacher's weights, so only "
                                    f"{', '.join(sorted(FREE_MODEL_FIELDS))} may differ")
    mine, theirs = student.diffusion.num_train_timesteps, teacher.cfg.diffusion.num_train_timesteps
    if mine != theirs:
        raise DistillInputError(f"diffusion.num_train_timesteps={mine} does not match the teacher's {theirs} "
                                f"({teacher.source}): the student's timesteps would mean other noise levels")


def _guidance(teacher: Teacher, cfg: Config) -> None:
    """Resolve the teacher's guidance (its own unless overridden) and check it can run."""
    d = cfg.distill
    if d.teacher_cfg_scale is None:
        d.teacher_cfg_scale = teacher.cfg.diffusion.cfg_scale
    if d.teacher_cfg_mode is None:
        d.teacher_cfg_mode = teacher.cfg.diffusion.cfg_mode if cfg.model.arch == "scd" else "action"
    if d.teacher_cfg_scale == 1.0:
        return
    if d.teacher_cfg_mode == "action" and cfg.model.num_actions == 0:
        raise DistillInputError("distill.teacher_cfg_mode='action' needs an action-conditioned teacher "
                                "(model.num_actions > 0)")
    if cfg.model.arch == "causal_dit" and d.teacher_cfg_mode != "action":
        raise DistillInputError("the dense baseline guides with null actions only: set distill.teacher_cfg_mode=action")


def build_student_config(teacher: Teacher, steps: int, out: Path, recipe: Path | None, overrides: list[str],
                         teacher_checkpoint_given: bool, teacher_steps: int | None, prior: Config | None) -> Config:
    """Teacher config -> recipe -> (uniform schedule) -> overrides -> what scd-distill owns."""
    owned = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] in OWNED]
    if owned:
        raise DistillInputError(f"{owned[0]} is set by scd-distill; use {OWNED[owned[0]]}")
    base = to_dict(teacher.cfg)
    base["distill"] = to_dict(Config())["distill"]  # a distilled teacher's own settings are not the student's
    merged = OmegaConf.create(base)
    if recipe is not None:
        if not recipe.is_file():
            raise DistillInputError(f"--config {recipe} does not exist")
        raw = yaml.safe_load(recipe.read_text()) or {}
        try:
            from_dict(Config, raw, prefix="")
        except ConfigError as exc:
            raise DistillInputError(f"{recipe}: {exc}") from None
        merged = OmegaConf.merge(merged, OmegaConf.create(raw))
    merged = OmegaConf.merge(merged, {"diffusion": {"sample_schedule": "uniform"}})
    cfg = config_from_text(OmegaConf.to_yaml(merged), overrides)
    d = cfg.distill
    d.teacher = str(teacher.source)
    d.teacher_checkpoint = str(teacher.checkpoint)
    if prior is not None and not teacher_checkpoint_given:
        d.teacher_checkpoint = prior.distill.teacher_checkpoint  # a resume keeps its teacher
    d.teacher_steps = teacher_steps or (prior.distill.teacher_steps if prior else None) \
        or teacher.cfg.diffusion.sample_steps
    if steps > d.teacher_steps:
        raise DistillInputError(f"--steps {steps} exceeds the teacher's {d.teacher_steps} steps "
                                f"(distill.teacher_steps); a student takes fewer steps than its teacher")
    _guidance(teacher, cfg)
    cfg.diffusion.sample_steps = steps
    cfg.diffusion.cfg_scale = 1.0
    # the teacher's evaluation guidance scales would guide a student whose guidance is distilled in
    cfg.diffusion.eval_cfg_scales = None
    cfg.train.run_dir = str(out)
    cfg.train.init_from = None
    check_student_model(cfg, teacher)
    validate(cfg)
    return cfg


def check_run_dir(out: Path, cfg: Config, teacher: Teacher) -> None:
    """``out`` is new, or holds this same distillation (which then resumes)."""
    prior = read_prior(out)
    if prior is None:
        if out.is_dir() and any(out.iterdir()):
            raise DistillInputError(f"--out {out} exists and holds files but no config.yaml; choose an empty or "
                                    "new directory")
        return
    for section, name in IDENTITY_FIELDS:
        before, now = getattr(getattr(prior, section), name), getattr(getattr(cfg, section), name)
        if before != now:
            raise DistillInputError(f"{out} holds a distillation with {section}.{name}={before!r}, this one has "
                                    f"{now!r}; resume it with the same settings or choose another --out")
    if prior.model != cfg.model:
        raise DistillInputError(f"{out} holds a distillation of another model config; choose another --out")


def read_prior(out: Path) -> Config | None:
    """The config of a run already in ``out`` (None when there is none); refuses non-distillation runs."""
    if not (out / "config.yaml").is_file():
        return None
    try:
        prior = load_config(out / "config.yaml")
    except ConfigError as exc:
        raise DistillInputError(f"--out {out} holds a config.yaml that does not load: {exc}") from None
    if prior.distill.teacher is None:
        raise DistillInputError(f"--out {out} holds an ordinary training run (no distill.teacher); choose another "
                                "directory")
    return prior


class DistillStage:
    """The training stage scd-distill hands the trainer: the student beside its frozen teacher and
    the distillation objective (see scd_train.diffusion.distill)."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher

    def check(self, cfg: Config) -> None:  # noqa: ARG002 - plan() has checked the student's config
        return None

    def build_model(self, cfg: Config, resuming: bool) -> nn.Module:  # noqa: ARG002
        """The pair with the teacher's EMA weights in both halves; a resume then loads the student's
        (and the frozen teacher's) weights from its checkpoint."""
        from scd_train.diffusion.distill import DistillationPair, SCDTeacher, build_method
        from scd_train.models import build_model

        teacher = build_model(cfg.model)
        weights = self.teacher.ema_weights(teacher)
        missing, unexpected = teacher.load_state_dict(weights, strict=False)
        missing = [m for m in missing if m in dict(teacher.named_parameters())]
        if missing or unexpected:
            raise DistillInputError(f"teacher {self.teacher.checkpoint} does not match its config: missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}")
        student = build_model(cfg.model)
        student.load_state_dict(teacher.state_dict())
        if cfg.model.arch == "causal_dit":
            return DistillationPair(student, teacher, build_method(cfg))
        if not cfg.distill.train_encoder:
            student.encoder.requires_grad_(False)  # shared with the teacher
        frozen = SCDTeacher(teacher.decoder, teacher.encoder if cfg.distill.train_encoder else None)
        return DistillationPair(student, frozen, build_method(cfg))

    def build_objective(self, cfg: Config):  # noqa: ARG002 - one objective for every architecture
        from scd_train.diffusion.distill import DistillObjective

        return DistillObjective()

    def step_flops(self, cfg: Config, clip_frames: int):
        from scd_train.diffusion.distill import distill_step_flops

        return distill_step_flops(cfg, clip_frames)


def write_teacher_record(run_dir: Path, teacher: Teacher, cfg: Config) -> Path:
    from scd_train.checkpoint import atomic_write_text
    from scd_train.diffusion.distill import teacher_substeps

    record = {"method": cfg.distill.method, "student_steps": cfg.diffusion.sample_steps,
              "student_schedule": cfg.diffusion.sample_schedule, "teacher_steps": cfg.distill.teacher_steps,
              "teacher_substeps_per_student_step": teacher_substeps(cfg.distill.teacher_steps,
                                                                    cfg.diffusion.sample_steps),
              "teacher_cfg_scale": cfg.distill.teacher_cfg_scale, "teacher_cfg_mode": cfg.distill.teacher_cfg_mode,
              "self_rollout": cfg.distill.self_rollout, "train_encoder": cfg.distill.train_encoder,
              "teacher": teacher.record()}
    path = run_dir / "teacher.json"
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


def default_out(teacher: Path, steps: int) -> Path:
    stem = teacher.stem if teacher.suffix == ".safetensors" else teacher.name
    return teacher.parent / f"{stem}-distill-k{steps}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("teacher", type=Path, help="the teacher: a run directory or an EMA .safetensors export")
    parser.add_argument("--steps", type=int, required=True, help="the student's Euler steps per frame (e.g. 1, 2, 4)")
    parser.add_argument("--out", type=Path, help="run directory (default: <teacher>-distill-k<steps>)")
    parser.add_argument("--config", type=Path, help="recipe YAML merged over the teacher's config")
    parser.add_argument("--teacher-checkpoint", help="teacher checkpoint directory (default: the newest complete one)")
    parser.add_argument("--teacher-steps", type=int, help="the teacher's Euler steps (default: its sample_steps)")
    parser.add_argument("--baseline", action="store_true",
                        help="the teacher is the dense causal baseline (model.arch=causal_dit), distilled the same way")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=300 distill.self_rollout=true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is used instead")
    return parser.parse_intermixed_args(argv)


def plan(args: argparse.Namespace) -> tuple[Config, Teacher]:
    """The student's config and its teacher, every input checked; reads files, writes nothing."""
    if args.steps < 1:
        raise DistillInputError(f"--steps {args.steps}: a student takes at least 1 step")
    if args.teacher_steps is not None and args.teacher_steps < 1:
        raise DistillInputError(f"--teacher-steps {args.teacher_steps} must be >= 1")
    teacher = resolve_teacher(args.teacher, args.teacher_checkpoint)
    arch = teacher.cfg.model.arch
    if arch != "scd" and not args.baseline:
        raise DistillInputError(f"teacher {args.teacher} has model.arch={arch!r}, not 'scd': scd-distill distils "
                                "SCD's frame decoder; pass --baseline to distil the dense baseline the same way")
    if arch == "scd" and args.baseline:
        raise DistillInputError(f"--baseline: teacher {args.teacher} is an SCD run (model.arch='scd'), not the "
                                "dense baseline")
    out = args.out or default_out(args.teacher, args.steps)
    if out.resolve() == teacher.source:
        raise DistillInputError(f"--out {out} is the teacher itself; choose another directory")
    prior = read_prior(out)
    cfg = build_student_config(teacher, args.steps, out, args.config, args.overrides,
                               args.teacher_checkpoint is not None, args.teacher_steps, prior)
    if prior is not None and cfg.distill.teacher_checkpoint != str(teacher.checkpoint):
        teacher = resolve_teacher(args.teacher, cfg.distill.teacher_checkpoint)
    check_run_dir(out, cfg, teacher)
    return cfg, teacher


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from scd_train.parallel.launch_env import read_launch_env
    from scd_train.parallel.runtime import init_runtime
    from scd_train.train import _exit_without_finalization, _run_dir_kept_on_failed_start, preflight
    from scd_train.trainer import Trainer

    # Bad input is an InputError the command wrapper prints once, as for scd-train.
    cfg, teacher = plan(args)
    preflight(cfg)
    read_launch_env(os.environ)  # a broken launch fails in a second, before the heavy imports
    t = cfg.train
    runtime = init_runtime(t.device, t.collective_timeout_s / 60, t.rendezvous_timeout_s)
    runtime.barrier()  # every rank has read the run directory before rank 0 writes into it
    with _run_dir_kept_on_failed_start(Path(t.run_dir)):
        trainer = Trainer(cfg, runtime, stage=DistillStage(teacher))
        if runtime.is_main:
            write_teacher_record(trainer.run_dir, teacher, cfg)
    result = trainer.run()
    trainer.runtime.shutdown()
    if runtime.is_main:
        print(f"{result.status} at step {result.step}; {cfg.diffusion.sample_steps}-step student in {result.run_dir} "
              f"(teacher {teacher.source}, {cfg.distill.teacher_steps} steps)")
    if runtime.world_size > 1:
        _exit_without_finalization(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
