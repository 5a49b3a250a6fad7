"""The batch every loader yields and the trainer consumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class Batch:
    latents: Tensor  # (B, F, C, H, W), normalized
    actions: Tensor | None  # (B, F) int64, action t leads into frame t
    keys: list[str]  # one sample key per clip, for error messages and resume checks

    def to(self, device: torch.device) -> Batch:
        actions = None if self.actions is None else self.actions.to(device, non_blocking=True)
        return Batch(self.latents.to(device, non_blocking=True), actions, self.keys)

    def truncate(self, frames: int) -> Batch:
        actions = None if self.actions is None else self.actions[:, :frames]
        return Batch(self.latents[:, :frames], actions, self.keys)


class ResumableLoader(Protocol):
    """An endless iterator of batches whose position round-trips through a checkpoint."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
