"""DeepSpeed ZeRO stage 3 through ``deepspeed.initialize`` with our AdamW and parameter groups.

Parameters, gradients and optimizer state are partitioned across ranks; DeepSpeed keeps fp32
master partitions and reduces gradients in fp32. The EMA shadows each rank's fp32 master
partition, so it is partitioned exactly like the parameters and saved beside DeepSpeed's files.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scd_train.checkpoint import atomic_torch_save
from scd_train.config import Config
from scd_train.ema import EMA, canonical_name
from scd_train.errors import ResumeError
from scd_train.parallel.backend import TrainingBackend
from scd_train.parallel.deepspeed_config import build_deepspeed_config
from scd_train.parallel.runtime import Runtime, ensure_process_group
from scd_train.precision.extra_state import trusted_extra_state

CHECKPOINT_SUBDIR = "deepspeed"  # <checkpoint>/state/deepspeed: weights.py detects the format by it
TAG = "zero3"


def ema_file(rank: int) -> str:
    return f"ema_rank_{rank:05d}.pt"


def _import_deepspeed():
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed still calls the collective names torch renamed; the warning is DeepSpeed's to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")

    # The shared-memory all-reduce op is JIT-compiled (~30 s) at every cold start on CPU and
    # leaves buffers in /dev/shm; plain gloo serves CPU runs, NCCL serves GPU runs.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedBackend(TrainingBackend):
    name = "deepspeed"
    supports_reshard = False  # ZeRO-3 partitions are laid out for the world size that wrote them

    def __init__(self, model: nn.Module, param_groups: list[dict], cfg: Config, runtime: Runtime) -> None:
        deepspeed = _import_deepspeed()
        ensure_process_group(runtime)  # DeepSpeed needs one even for a single process
        if cfg.train.activation_checkpointing:
            from scd_train.parallel.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        super().__init__(model, param_groups, cfg, runtime)
        self.ds_config = build_deepspeed_config(cfg, bf16=self.compute_dtype == torch.bfloat16,
                                                world_size=runtime.world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False)
        self.module = self.engine
        self._deepspeed = deepspeed
        self.engine.set_gradient_accumulation_boundary(True)

    def build_optimizer(self, param_groups: list[dict]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        # Plain torch AdamW: DeepSpeed's fused/CPU Adam would JIT-compile at start-up. ZeRO-3 steps
        # it on the flat fp32 partitions and keeps each group's name and lr.
        return torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay, foreach=True)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-batches before the last one only accumulate; the last one reduces (boundary)."""
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divides by grad_accum

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """The global norm of the reduced fp32 gradient partitions; DeepSpeed clips inside ``step``
        (gradient_clipping in its config) with the same norm."""
        from deepspeed.utils import safe_get_local_grad

        squares = torch.zeros((), dtype=torch.float32, device=self.runtime.device)
        for p in self.model.parameters():
            grad = safe_get_local_grad(p)
            if grad is not None:
                squares = squares + grad.float().pow(2).sum()
        squares = squares.to(self.runtime.collective_device)
        dist.all_reduce(squares)
        return squares.sqrt().to(self.runtime.device)

    def step(self) -> None:
        self.engine.step()

    def skip_step(self) -> None:
        # Gradients of the next step then overwrite the reduced partitions instead of adding to them.
        self.engine.optimizer.zero_grad(set_to_none=True)

    def local_parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p.ds_tensor).all()) for p in self.model.parameters())

    def ema_parameters(self) -> list[tuple[str, Tensor]]:
        """This rank's fp32 master partition of each parameter (a view DeepSpeed updates in place)."""
        from deepspeed.utils import safe_get_local_fp32_param

        return [(n, safe_get_local_fp32_param(p)) for n, p in self.model.named_parameters() if p.requires_grad]

    # -- state ---------------------------------------------------------------------------------
    def save(self, directory: Path, ema: EMA) -> None:
        target = directory / "state" / CHECKPOINT_SUBDIR
        target.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(target), tag=TAG, client_state={}, save_latest=False)
        atomic_torch_save(self._ema_partition(ema), target / ema_file(self.runtime.rank))

    def _ema_partition(self, ema: EMA) -> dict:
        params = dict(self.model.named_parameters())
        layout = {}
        for name, p in params.items():
            if p.requires_grad:
                layout[canonical_name(name)] = {"shape": list(p.ds_shape), "numel": int(p.ds_numel)}
        return {"world_size": self.runtime.world_size, "rank": self.runtime.rank, "layout": layout,
                "shards": {n: t.detach().clone() for n, t in ema.state_dict().items()}}

    def load(self, directory: Path, ema: EMA) -> None:
        target = directory / "state" / CHECKPOINT_SUBDIR
        with trusted_extra_state():  # TE's FP8 scaling state rides in the module state dict
            path, _ = self.engine.load_checkpoint(str(target), tag=TAG, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ResumeError(f"DeepSpeed found no checkpoint '{TAG}' under {target}")
        saved = torch.load(target / ema_file(self.runtime.rank), weights_only=False)
        ema.load_state_dict(saved["shards"])

    def full_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for name, p in self.model.named_parameters():
            with self._deepspeed.zero.GatheredParameters([p]):
                if self.runtime.is_main:
                    out[canonical_name(name)] = p.detach().float().cpu().clone()
        return out
