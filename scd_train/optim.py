"""Named optimizer groups (encoder / decoder, with no-decay variants) and the LR schedule.

The learning rate is a pure function of the step, written into every group before each step, so
a resume cannot re-warm or collapse groups; ``check_learning_rates`` proves it after start-up and
after every resume.
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


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    ratios = {"encoder": cfg.encoder_lr_ratio, "decoder": cfg.decoder_lr_ratio, "model": 1.0}
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        base = group_of(name)
        split = cfg.weight_decay > 0 and not decays(name, param)
        key = f"{base}_no_decay" if split else base
        if key not in groups:
            groups[key] = {"name": key, "params": [], "base_lr": cfg.lr * ratios[base],
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
    if cfg.freeze_encoder_after is not None and group["module"] == "encoder" and step >= cfg.freeze_encoder_after:
        return 0.0
    return group["base_lr"] * warmup_factor(step, cfg.warmup_steps, cfg.reference_warmup_from_zero)


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
        want = expected_lr(group, step, cfg)
        if not math.isclose(group["lr"], want, rel_tol=1e-9, abs_tol=1e-15):
            raise ValueError(f"optimizer group '{group['name']}' has lr={group['lr']:.3e} at step {step}, "
                             f"expected {want:.3e} (optim.lr x ratio x warmup)")
