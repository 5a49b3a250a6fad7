"""Training backends: what wraps the model, steps the optimizer and writes sharded state.

The training loop talks only to this interface, so ``single``, ``ddp``, ``fsdp2`` and
``deepspeed`` share one loop. Models arrive unwrapped; backends never edit model code.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from scd_train.config import Config
from scd_train.ema import EMA
from scd_train.parallel.runtime import Runtime
from scd_train.precision.extra_state import load_request, pack_extra_state, trusted_extra_state, unpack_extra_state


def resolve_precision(choice: str, device: torch.device) -> torch.dtype:
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


class TrainingBackend:
    """Base class; subclasses override wrapping, stepping and state I/O where they differ."""

    name = "base"
    # Whether a checkpoint written by one world size can be loaded by another (DCP reshards).
    supports_reshard = True

    def __init__(self, model: nn.Module, param_groups: list[dict], cfg: Config, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.model = model  # unwrapped: parameter names, EMA, export
        self.module: nn.Module = model  # what forward is called on
        self.compute_dtype = resolve_precision(cfg.train.precision, runtime.device)
        self.optimizer = self.build_optimizer(param_groups)

    def build_optimizer(self, param_groups: list[dict]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        fused = self.runtime.device.type == "cuda"
        return torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay, fused=fused)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.compute_dtype)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-batches whose gradients are not reduced yet (accumulation)."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Global gradient norm before clipping (clipping skipped when max_norm is 0)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        limit = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def local_parameters_finite(self) -> bool:
        """Whether this rank's share of the parameters is free of NaN/Inf (no collective)."""
        return all(bool(torch.isfinite(local_tensor(p.detach())).all()) for p in self.model.parameters())

    def ema_parameters(self) -> list[tuple[str, Tensor]]:
        """(name, parameter) pairs the EMA shadows, in the parameters' own sharding."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # -- state ---------------------------------------------------------------------------------
    def save(self, directory: Path, ema: EMA) -> None:
        """Write model, optimizer and EMA into ``directory`` (every rank calls this)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        model_sd = pack_extra_state(model_sd)  # FP8 scaling state: variable-size, stored whole
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()},
                     checkpoint_id=str(directory / "state"))

    def load(self, directory: Path, ema: EMA) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        model_sd, kept_extra = load_request(model_sd, directory / "state")
        state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(directory / "state"))
        with trusted_extra_state():
            set_state_dict(self.model, self.optimizer, model_state_dict=unpack_extra_state(state["model"], kept_extra),
                           optim_state_dict=state["optim"])
        ema.load_state_dict(state["ema"])

    def full_state_dict(self) -> dict[str, Tensor]:
        """Unsharded model weights on CPU (rank 0 gets them; others may get an empty dict)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class SingleBackend(TrainingBackend):
    name = "single"


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def _quiet_single_process():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        yield


def build_backend(model: nn.Module, param_groups: list[dict], cfg: Config, runtime: Runtime) -> TrainingBackend:
    """Wrap ``model`` for ``cfg.train.backend``; ``param_groups`` name the model's parameters
    (backends that replace parameters while sharding rebuild them from the wrapped model)."""
    name = cfg.train.backend
    if name == "single" and runtime.world_size > 1:
        from scd_train.config import ConfigError

        raise ConfigError(f"train.backend='single' cannot run {runtime.world_size} processes (WORLD_SIZE="
                          f"{runtime.world_size} detected); choose train.backend=ddp, fsdp2 or deepspeed")
    if name == "deepspeed":
        from scd_train.parallel.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, param_groups, cfg, runtime)
    model.to(runtime.device)
    if cfg.train.activation_checkpointing:
        from scd_train.parallel.checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if name == "single":
        return SingleBackend(model, param_groups, cfg, runtime)
    if name == "ddp":
        from scd_train.parallel.ddp import DDPBackend

        return DDPBackend(model, param_groups, cfg, runtime)
    if name == "fsdp2":
        from scd_train.parallel.fsdp2 import FSDP2Backend

        return FSDP2Backend(model, cfg, runtime)
    raise ValueError(f"train.backend={name!r} is not one of single, ddp, fsdp2, deepspeed")
