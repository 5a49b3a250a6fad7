"""Single-device model code: no distribution, data or logging here."""

from __future__ import annotations

from torch import nn

from scd_train.config import ModelConfig
from scd_train.models.causal_dit import CausalDiT
from scd_train.models.decoder import FrameDecoder
from scd_train.models.encoder import CausalEncoder
from scd_train.models.scd import SCDModel

__all__ = ["CausalDiT", "CausalEncoder", "FrameDecoder", "SCDModel", "build_model", "transformer_blocks"]


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "scd":
        return SCDModel(cfg)
    return CausalDiT(cfg)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) for every DiT block: the unit of checkpointing and sharding."""
    from scd_train.models.block import DiTBlock

    return [(name, m) for name, m in model.named_modules() if isinstance(m, DiTBlock)]
