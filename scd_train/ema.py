"""Exponential moving average of parameters, kept in the parameters' own sharding.

The shadow of a sharded parameter (FSDP2 DTensor, DeepSpeed partition) is a tensor of the same
sharding, so EMA memory scales down with the world size and checkpoints shard it like the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

WRAPPER_COMPONENTS = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


def canonical_name(name: str) -> str:
    """Parameter name without the path components that wrappers (checkpointing, compile, DDP)
    insert."""
    parts = [p for p in name.split(".") if p not in WRAPPER_COMPONENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


class EMA:
    def __init__(self, named_params: list[tuple[str, Tensor]], decay: float) -> None:
        self.decay = decay
        self.names = [canonical_name(n) for n, _ in named_params]
        self.params = [p for _, p in named_params]
        with torch.no_grad():
            self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        current = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, first: {missing[0]}")
        for name, shadow in zip(self.names, self.shadow):
            if state[name] is not shadow:
                shadow.copy_(state[name])

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load EMA weights into the live parameters (e.g. for evaluation)."""
        backup = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, b in zip(self.params, backup):
                p.copy_(b)
