"""FP8 through NVIDIA Transformer Engine (TE).

The selected ``nn.Linear`` layers are rebuilt as ``te.Linear`` with the same weights and the
same parameter names, so checkpoint keys, optimizer groups and EMA names do not change. The
blocks' layer norms are not fused into ``te.LayerNormLinear`` / ``te.LayerNormMLP``: adaLN
modulation (per-frame shift and scale) sits between each norm and its linear, and TE's fused
modules have no place for it.

TE is imported lazily: it has no CPU build, and importing it needs CUDA, cuDNN and NCCL
libraries. Forward passes run under TE's autocast (``te.autocast`` in TE >= 2.8,
``te.fp8_autocast`` before), backward outside it, as TE prescribes. With delayed scaling the
amax history lives in each module's ``_extra_state``; ``scd_train.precision.extra_state`` carries
it through DCP checkpoints, and DeepSpeed saves it with the module state dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from scd_train.config import Fp8Config
from scd_train.precision.selection import Fp8Error


def import_te():
    """``transformer_engine.pytorch``, or an Fp8Error saying why it cannot be used here."""
    try:
        import transformer_engine.pytorch as te
    except (ImportError, RuntimeError, OSError) as exc:
        raise Fp8Error(
            f"precision.fp8.backend='te' but Transformer Engine cannot be imported ({type(exc).__name__}: {exc}). "
            "Install it for your CUDA version (pip install --no-build-isolation 'transformer-engine[pytorch]', "
            "or use an NGC PyTorch container), or set precision.fp8.backend=torchao") from exc
    return te


def te_recipe(cfg: Fp8Config):
    from transformer_engine.common import recipe as te_recipes

    fmt = te_recipes.Format.HYBRID if cfg.fp8_format == "hybrid" else te_recipes.Format.E4M3
    if cfg.recipe == "delayed":
        return te_recipes.DelayedScaling(fp8_format=fmt, margin=cfg.margin, amax_history_len=cfg.amax_history_len,
                                         amax_compute_algo=cfg.amax_compute_algo, reduce_amax=cfg.reduce_amax)
    if cfg.recipe == "current":
        return te_recipes.Float8CurrentScaling(fp8_format=fmt)
    if cfg.recipe == "mxfp8":
        return te_recipes.MXFP8BlockScaling(fp8_format=fmt, margin=cfg.margin)
    raise Fp8Error(f"precision.fp8.recipe={cfg.recipe!r} is not a Transformer Engine recipe")


def check_te_support(te, cfg: Fp8Config) -> None:
    """TE's own verdict on this GPU (CUDA/cuBLAS versions included), beyond the capability check."""
    probe = getattr(te, "is_mxfp8_available" if cfg.recipe == "mxfp8" else "is_fp8_available", None)
    if probe is None:  # older TE: its autocast performs the same check on entry
        return
    available, reason = probe(return_reason=True)
    if not available:
        raise Fp8Error(f"Transformer Engine cannot run precision.fp8.recipe={cfg.recipe!r} here: {reason}")


def convert_te(model: nn.Module, names: list[str], device: torch.device) -> int:
    """Replace each named ``nn.Linear`` with a ``te.Linear`` holding the same weights."""
    te = import_te()
    modules = dict(model.named_modules())
    for name in names:
        old = modules[name]
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(parent, attr, new)
    return sum(1 for name, m in model.named_modules() if name in set(names) and is_te_module(m))


def is_te_module(module: nn.Module) -> bool:
    try:
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
    except (ImportError, RuntimeError, OSError):
        return False
    return isinstance(module, TransformerEngineBaseModule)


def te_autocast_factory(cfg: Fp8Config, group) -> Callable[[], contextlib.AbstractContextManager]:
    """A fresh TE autocast context per micro-batch (amaxes are reduced over ``group`` on exit)."""
    te = import_te()
    recipe = te_recipe(cfg)
    if hasattr(te, "autocast"):
        return lambda: te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def te_checkpoint_fn() -> Callable:
    """TE's activation checkpoint: recomputes with the forward's FP8 scales and does not count the
    recompute as a second amax update (torch's checkpoint would)."""
    te = import_te()
    return te.checkpoint
