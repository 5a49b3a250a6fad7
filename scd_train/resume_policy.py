"""What a resume may change relative to the checkpoint it continues, and what it may not.

Every setting is compared with the config saved inside the checkpoint:

* **refused** (the run would silently train something else): the architecture (``model.*`` except
  the training-only fields below, the attention window among them; also checked tensor by tensor
  against the shapes the checkpoint recorded), whatever the saved data position depends on
  (``data.batch_size``, ``data.seed``, ``data.source``), a move between a ZeRO-3 and a DCP
  checkpoint format, switching weight decay on or off (it changes the parameter groups), and a
  world size the backend cannot reshard to; in a distillation run (``distill.teacher`` set,
  trained by ``scd-distill``) also what the student learns: the teacher, its steps and guidance,
  the method, what trains, and the student's own step count and schedule (its step grid is what is
  distilled);
* **applied and logged**: everything else that shapes training, e.g. ``optim.lr`` and the per-module
  learning-rate ratios (the rates follow the new values from the resumed step on, and the logged
  ``lr/*`` show them), ``train.grad_accum`` (a different number of clips per update), the
  diffusion objective, precision;
* **unremarkable**: how long and how visibly the run goes (``train.steps``, checkpoint cadence,
  ``log.*``, time-outs).

A refused change names each differing value, saved vs now, and points to the weights-only path:
export the checkpoint and start a new run directory with ``train.init_from`` (for a distillation,
which takes no ``train.init_from``: start it again with another ``--out``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scd_train.errors import InputError

# Settings that say how long, where and how visibly a run goes, not what it trains.
UNREMARKABLE = ("train.steps", "train.resume", "train.run_dir", "train.checkpoint_every", "train.keep_checkpoints",
                "train.on_used_run_dir", "train.stop_grace_s", "train.rendezvous_timeout_s",
                "train.collective_timeout_s", "train.run_dir_lock_wait_s", "train.device", "log.")
# Model fields that change how the model is trained or checked, not which function it computes.
MODEL_TRAINING_FIELDS = {"model.attention", "model.action_dropout", "model.context_noise", "model.encoder_input",
                         "model.max_frames",
                         # the attention window is a mask over the same weights: a full-history run may be
                         # fine-tuned windowed (the trainer logs the change)
                         "model.encoder_window", "model.encoder_sink_frames"}
# What a distillation run is distilling: changing one would train the student towards other targets
# (teacher, guidance, trajectory) or on another grid (its step count and schedule), or change which
# parameters train (train_encoder). Everything else of ``distill`` (e.g. rollout_context_frames) is applied.
DISTILL_IDENTITY = {
    "distill.method": "the distillation method", "distill.teacher": "the teacher run",
    "distill.teacher_checkpoint": "the teacher's weights", "distill.teacher_steps": "the teacher's trajectory",
    "distill.teacher_cfg_scale": "the teacher's guided velocity", "distill.teacher_cfg_mode": "the teacher's "
    "guided velocity", "distill.self_rollout": "the states the student is trained from",
    "distill.train_encoder": "which parameters train (the optimizer's groups)",
    "diffusion.sample_steps": "the student's step grid", "diffusion.sample_schedule": "the student's step grid"}
# Settings the saved data position is expressed in.
DATA_POSITION = {"data.batch_size": "clips per rank and micro-batch", "data.seed": "the shuffle order",
                 "data.source": "the kind of data reader"}


class ResumeRefused(InputError):
    """The run's settings differ from its checkpoint's in a way that cannot continue that training."""


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    now: Any
    note: str = ""

    def line(self) -> str:
        text = f"{self.key}: {self.saved!r} (checkpoint) -> {self.now!r} (now)"
        return f"{text}: {self.note}" if self.note else text


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unremarkable(key: str) -> bool:
    return any(key == u or (u.endswith(".") and key.startswith(u)) for u in UNREMARKABLE)


def compare_configs(saved: dict, now: dict) -> tuple[list[Change], list[Change]]:
    """(refused, applied) differences between two resolved configs (nested dicts). Keys that one
    side lacks (a field added or removed since the checkpoint was written) are not compared."""
    old, new = flatten(saved), flatten(now)
    distilling = old.get("distill.teacher") is not None or new.get("distill.teacher") is not None
    refused, applied = [], []
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if a == b or _unremarkable(key):
            continue
        if key.startswith("model.") and key not in MODEL_TRAINING_FIELDS:
            refused.append(Change(key, a, b, "changes the architecture"))
        elif distilling and key in DISTILL_IDENTITY:
            refused.append(Change(key, a, b, f"a distillation run's {DISTILL_IDENTITY[key]} cannot change"))
        elif key in DATA_POSITION:
            refused.append(Change(key, a, b, f"the saved data position depends on {DATA_POSITION[key]}"))
        elif key == "train.backend" and "deepspeed" in (a, b):
            refused.append(Change(key, a, b, "ZeRO-3 (deepspeed) and DCP (single, ddp, fsdp2) checkpoints do "
                                             "not load into each other"))
        elif key == "optim.weight_decay" and (a > 0) != (b > 0):
            refused.append(Change(key, a, b, "switching weight decay on or off changes the parameter groups "
                                             "the optimizer state belongs to"))
        elif key == "train.grad_accum":
            applied.append(Change(key, a, b, f"each update now averages {b} micro-batches instead of {a} "
                                             f"({b / a:g}x the clips per update)"))
        elif key == "train.init_from":
            applied.append(Change(key, a, b, "ignored: a resume continues the checkpoint's weights"))
        elif key.startswith("optim.") and ("lr" in key or key == "optim.warmup_steps"):
            applied.append(Change(key, a, b, "the learning rates follow the new value from the resumed step on"))
        else:
            applied.append(Change(key, a, b))
    return refused, applied


def tensor_shapes(named_parameters) -> dict[str, list[int]]:
    """{canonical name: full shape} of a model's parameters (before any sharding wrapper)."""
    from scd_train.ema import canonical_name

    return {canonical_name(name): list(p.shape) for name, p in named_parameters}


def _group(names: list[str]) -> list[str]:
    """Collapse per-block names: encoder.blocks.2.qkv.weight, encoder.blocks.2.mlp.0.bias -> encoder.blocks.2.*"""
    groups: dict[str, int] = {}
    for name in sorted(names):
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        key = ".".join(parts[: cut + 1]) + ".*" if cut is not None else name
        groups[key] = groups.get(key, 0) + 1
    return [f"{k} ({n} tensors)" if k.endswith("*") else k for k, n in groups.items()]


def compare_shapes(saved: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
    """Lines naming the tensors only the checkpoint has, only the model has, and those whose shape differs."""
    lines = []
    gone = [n for n in saved if n not in now]
    added = [n for n in now if n not in saved]
    reshaped = [n for n in saved if n in now and list(saved[n]) != list(now[n])]
    if gone:
        lines.append(f"in the checkpoint, not in the model now: {', '.join(_group(gone))}")
    if added:
        lines.append(f"in the model now, not in the checkpoint: {', '.join(_group(added))}")
    for name in reshaped[:12]:
        lines.append(f"{name}: shape {tuple(saved[name])} in the checkpoint, {tuple(now[name])} now")
    if len(reshaped) > 12:
        lines.append(f"... and {len(reshaped) - 12} more tensors with another shape")
    return lines


def check_resume(checkpoint: str, saved_config: dict | None, config: dict, saved_shapes: dict | None,
                 shapes: dict[str, list[int]], saved_world: int | None = None, world: int = 1,
                 can_reshard: bool = True) -> list[Change]:
    """The applied changes of resuming ``checkpoint`` with ``config``; raises ResumeRefused listing
    everything that cannot continue."""
    refused, applied = compare_configs(saved_config, config) if saved_config is not None else ([], [])
    shape_lines = compare_shapes(saved_shapes, shapes) if saved_shapes is not None else []
    lines = [c.line() for c in refused] + shape_lines
    if saved_world is not None and saved_world != world and not can_reshard:
        lines.append(f"checkpoint {checkpoint} was written by {saved_world} ranks but this run has {world}; "
                     f"train.backend={config['train']['backend']!r} cannot reshard it: resume with {saved_world} ranks")
    if lines:
        raise ResumeRefused(
            f"cannot resume from {checkpoint}: this run differs from the one that wrote it\n  " + "\n  ".join(lines)
            + "\nResume with the checkpoint's settings (its config.yaml), or " + _fresh_start(checkpoint, config))
    return applied


def _fresh_start(checkpoint: str, config: dict) -> str:
    """How to start over when a resume is refused: a distillation (which takes no train.init_from; its
    student always starts from the teacher) starts again in another directory, a training run from the
    checkpoint's weights."""
    if (config.get("distill") or {}).get("teacher"):
        return ("start the distillation again with another --out (the student starts from the teacher's EMA "
                f"weights, {config['distill']['teacher']})")
    return (f"start a new run from its weights only: `scd-export <run_dir> --checkpoint {checkpoint} --out "
            "init.safetensors` (add --raw for the raw weights instead of the EMA), then "
            "train.init_from=init.safetensors with another train.run_dir (step 0, a fresh optimizer; the tensors "
            "must match the new model)")
