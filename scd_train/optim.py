"""Named optimizer groups (encoder / decoder, with no-decay variants) and the LR schedule.

The learning rate is a pure function of the step and of the config, written into every group
before each step, so a resume cannot re-warm or collapse groups. A checkpoint's optimizer state
brings back its own group settings (``base_lr``, weight decay, betas): ``apply_group_settings``
replaces them with the config's, so a resume with another ``optim.lr`` or ratio trains at the new
rates, and ``check_learning_rates`` compares every group with the config, never with what the
checkpoint restored.
"""

from __future__ import annotations

import math

from torch import nn

from scd_train.config import OptimConfig
from scd_train.ema import canonical_name


def group_of(name: str) -> str:
    """'encoder' or 'decoder' from a parameter's name; the dense baseline is all 'encoder'-free."""
    name = canonical_name(name)
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("decoder."):
        return "decoder"
    return "model"


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: not to biases, norm scales or embedding tables."""
    return param.dim() >= 2 and "embed.table" not in name


def configured_base_lr(module: str, cfg: OptimConfig) -> float:
    """optim.lr x the module's ratio: the rate after warmup of an 'encoder', 'decoder' or 'model' group."""
    ratios = {"encoder": cfg.encoder_lr_ratio, "decoder": cfg.decoder_lr_ratio, "model": 1.0}
    return cfg.lr * ratios[module]


def configured_weight_decay(group_name: str, cfg: OptimConfig) -> float:
    return 0.0 if group_name.endswith("_no_decay") else cfg.weight_decay


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        base = group_of(name)
        split = cfg.weight_decay > 0 and not decays(name, param)
        key = f"{base}_no_decay" if split else base
        if key not in groups:
            groups[key] = {"name": key, "params": [], "base_lr": configured_base_lr(base, cfg),
                           "weight_decay": 0.0 if split else cfg.weight_decay, "module": base}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for g in groups.values():
        g["lr"] = g["base_lr"]
    return list(groups.values())


def warmup_factor(step: int, warmup_steps: int, from_zero: bool = False) -> float:
    """Linear warmup over ``warmup_steps`` optimizer steps, then constant 1.

    Step s (0-based) trains at (s+1)/warmup_steps, so the first step already learns; ``from_zero``
    counts like the release's scheduler instead, s/warmup_steps, whose first step runs at lr 0.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step if from_zero else step + 1) / warmup_steps)


def expected_lr(group: dict, step: int, cfg: OptimConfig) -> float:
    """The group's rate at ``step`` as the config defines it (never from the group's own ``base_lr``)."""
    if cfg.freeze_encoder_after is not None and group["module"] == "encoder" and step >= cfg.freeze_encoder_after:
        return 0.0
    factor = warmup_factor(step, cfg.warmup_steps, cfg.reference_warmup_from_zero)
    return configured_base_lr(group["module"], cfg) * factor


def apply_group_settings(optimizer, cfg: OptimConfig) -> dict[str, tuple[float, float]]:
    """Write the config's base rate, weight decay, betas and eps into every group (after a checkpoint
    restored its own); returns {group: (previous base_lr, new base_lr)} for groups whose rate changed."""
    changed = {}
    for group in optimizer.param_groups:
        base = configured_base_lr(group["module"], cfg)
        previous = group.get("base_lr", base)
        if not math.isclose(previous, base, rel_tol=1e-12, abs_tol=0.0):
            changed[group["name"]] = (previous, base)
        group["base_lr"] = base
        group["weight_decay"] = configured_weight_decay(group["name"], cfg)
        group["betas"] = tuple(cfg.betas)
        group["eps"] = cfg.eps
    return changed


def set_learning_rates(optimizer, step: int, cfg: OptimConfig) -> dict[str, float]:
    """Write the step's learning rate into every group; returns {group name: lr}."""
    lrs = {}
    for group in optimizer.param_groups:
        group["lr"] = expected_lr(group, step, cfg)
        lrs[group["name"]] = group["lr"]
    return lrs


def check_learning_rates(optimizer, step: int, cfg: OptimConfig) -> None:
    """Fail if any group's hyper-parameters differ from what the config implies at ``step``."""
    for group in optimizer.param_groups:
        if "name" not in group:
            raise ValueError("an optimizer group lost its name (a wrapper rebuilt the groups)")
        name = group["name"]
        want = expected_lr(group, step, cfg)
        if not math.isclose(group["lr"], want, rel_tol=1e-9, abs_tol=1e-15):
            raise ValueError(f"optimizer group '{name}' has lr={group['lr']:.3e} at step {step}, "
                             f"expected {want:.3e} (optim.lr x ratio x warmup)")
        base = configured_base_lr(group["module"], cfg)
        if "base_lr" in group and not math.isclose(group["base_lr"], base, rel_tol=1e-9, abs_tol=1e-15):
            raise ValueError(f"optimizer group '{name}' has base_lr={group['base_lr']:.3e}, the config gives "
                             f"{base:.3e} (optim.lr x ratio)")
        decay = configured_weight_decay(name, cfg)
        if not math.isclose(group.get("weight_decay", decay), decay, rel_tol=1e-9, abs_tol=1e-15):
            raise ValueError(f"optimizer group '{name}' has weight_decay={group['weight_decay']}, the config "
                             f"gives {decay} (optim.weight_decay)")
