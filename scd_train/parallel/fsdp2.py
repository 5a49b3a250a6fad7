"""FSDP2: ``fully_shard`` on every transformer block, then on the root.

Parameters, gradients, AdamW state and the EMA are sharded along dim 0 (DTensor ``Shard(0)``).
The sharded parameters stay fp32 (the master weights); with ``train.precision=bf16`` each block is
all-gathered in bf16 for compute and its gradients are reduce-scattered in fp32.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from scd_train.config import Config
from scd_train.models.block import DiTBlock
from scd_train.optim import build_param_groups
from scd_train.parallel.backend import TrainingBackend
from scd_train.parallel.runtime import Runtime, ensure_process_group


def mixed_precision_policy(compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)


def shard_blocks(model: nn.Module, policy: MixedPrecisionPolicy) -> int:
    """``fully_shard`` each DiT block (or its activation-checkpoint wrapper) and then the root."""
    sharded = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.ModuleList):
            continue
        for child in parent:
            inner = getattr(child, "_checkpoint_wrapped_module", child)
            if isinstance(inner, DiTBlock):
                fully_shard(child, mp_policy=policy)
                sharded += 1
    # The root's own parameters (embeddings, heads) are used right after its forward; keeping
    # them gathered saves one all-gather per step.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return sharded


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of ``model`` unsharded, and kept so across forward calls, for the body.

    For no-grad work that reads parameters outside a unit's own forward (the streaming sampler
    precomputes each frame's step conditioning from the blocks' modulation layers); afterwards the
    units are resharded with the policy ``shard_blocks`` gave them (blocks reshard after forward,
    the root does not). A model without FSDP2 units is left as it is.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


class FSDP2Backend(TrainingBackend):
    name = "fsdp2"

    def __init__(self, model: nn.Module, cfg: Config, runtime: Runtime) -> None:
        from scd_train.parallel.backend import resolve_precision

        # The models return reshaped (view) outputs; the loss only reads them, never in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        ensure_process_group(runtime)  # fully_shard needs one even for a single process
        shard_blocks(model, mixed_precision_policy(resolve_precision(cfg.train.precision, runtime.device)))
        # fully_shard replaces every parameter with a DTensor one: build the groups afterwards.
        super().__init__(model, build_param_groups(model, cfg.optim), cfg, runtime)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        fsdp: FSDPModule = self.model  # type: ignore[assignment]
        fsdp.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fsdp.set_requires_gradient_sync(True)

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(total, DTensor):  # per-shard partial norms -> the global norm on every rank
            total = total.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total
