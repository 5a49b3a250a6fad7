"""``prepare_fp8``: validate, then convert a built model for FP8 training.

Order: select layers -> pre-flight (hardware, GEMM shapes traced on the meta device, repeated
calls) -> convert -> TE-aware activation checkpointing. It runs before the training backend
moves, checkpoints or shards the model, so backends see ordinary modules.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from scd_train.config import Config
from scd_train.models.block import DiTBlock
from scd_train.parallel.runtime import Runtime
from scd_train.precision.preflight import run_preflight
from scd_train.precision.selection import Fp8Error, Fp8Selection, select_fp8_linears

log = logging.getLogger(__name__)


@dataclass
class Fp8Training:
    """What the trainer needs from FP8: an autocast per micro-batch, and a report of what runs in FP8."""

    enabled: bool = False
    backend: str | None = None
    recipe: str | None = None
    emulated: bool = False
    fp8_layers: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    _autocast: Callable[[], contextlib.AbstractContextManager] | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Enter around each micro-batch's forward (TE autocast; torchao needs none)."""
        return self._autocast() if self._autocast is not None else contextlib.nullcontext()

    def summary(self) -> dict:
        return {"enabled": self.enabled, "backend": self.backend, "recipe": self.recipe,
                "emulated": self.emulated, "fp8_layers": len(self.fp8_layers),
                "high_precision_layers": len(self.excluded)}


def prepare_fp8(model: nn.Module, cfg: Config, runtime: Runtime) -> Fp8Training:
    """Convert ``model`` in place as ``precision.fp8`` asks; a disabled config changes nothing."""
    fp8 = cfg.precision.fp8
    if not fp8.enabled:
        return Fp8Training()
    selection = select_fp8_linears(model, fp8)
    run_preflight(cfg, selection.selected, runtime.device)
    result = Fp8Training(True, fp8.backend, fp8.recipe, emulated=runtime.device.type == "cpu",
                         fp8_layers=list(selection.selected), excluded=_excluded(selection))
    if fp8.backend == "torchao":
        from scd_train.precision.torchao_fp8 import convert_torchao

        converted = convert_torchao(model, selection.selected, fp8, runtime.device)
    else:
        converted = _prepare_te(model, cfg, runtime, selection, result)
    if converted != len(selection.selected):
        raise Fp8Error(f"FP8 conversion replaced {converted} of {len(selection.selected)} selected layers")
    _log_plan(result)
    return result


def _prepare_te(model: nn.Module, cfg: Config, runtime: Runtime, selection: Fp8Selection,
                result: Fp8Training) -> int:
    from scd_train.precision import te_fp8

    te = te_fp8.import_te()
    te_fp8.check_te_support(te, cfg.precision.fp8)
    if cfg.train.backend == "deepspeed":
        log.warning("Transformer Engine FP8 under DeepSpeed ZeRO-3 has open upstream failure reports; "
                    "smoke-test a save and resume on your GPUs before a long run")
    converted = te_fp8.convert_te(model, selection.selected, runtime.device)
    result._autocast = te_fp8.te_autocast_factory(cfg.precision.fp8, _amax_group(runtime))
    if cfg.train.activation_checkpointing:
        wrap_blocks_for_checkpointing(model, te_fp8.te_checkpoint_fn())
    return converted


def _amax_group(runtime: Runtime):
    if not runtime.distributed:
        return None
    import torch.distributed as dist

    return dist.group.WORLD


def wrap_blocks_for_checkpointing(model: nn.Module, checkpoint_fn: Callable) -> int:
    """Wrap every transformer block so its activations are recomputed through ``checkpoint_fn``.

    Uses torch's CheckpointWrapper, so parameter names and state dict keys stay those of the bare
    model; the backend's own activation checkpointing then finds no bare block left to wrap.
    """
    wrapped = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.ModuleList):
            continue
        for index, child in enumerate(parent):
            if isinstance(child, DiTBlock):
                parent[index] = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                   checkpoint_fn=checkpoint_fn, use_reentrant=False)
                wrapped += 1
    return wrapped


def _excluded(selection: Fp8Selection) -> dict[str, str]:
    out = dict(selection.auto_excluded)
    out.update({name: "precision.fp8.exclude" for name in selection.user_excluded})
    return out


def _log_plan(result: Fp8Training) -> None:
    mode = " (CPU emulation: numerics only, no speed-up)" if result.emulated else ""
    log.info("FP8 via %s, recipe %s%s: %d linear layers in FP8 (%s ... %s), %d kept in high precision",
             result.backend, result.recipe, mode, len(result.fp8_layers), result.fp8_layers[0],
             result.fp8_layers[-1], len(result.excluded))
