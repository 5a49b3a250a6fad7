"""Activation checkpointing per transformer block (non-reentrant, applied before sharding)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)

from scd_train.models.block import DiTBlock


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every DiT block in place; returns how many were wrapped."""
    wrapped = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.ModuleList):
            continue
        for index, child in enumerate(parent):
            if isinstance(child, DiTBlock):
                parent[index] = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                wrapped += 1
    return wrapped
