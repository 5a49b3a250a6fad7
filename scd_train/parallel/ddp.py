"""DistributedDataParallel: every rank holds the full model; gradients are averaged in fp32.

Parameters stay fp32 (autocast provides bf16 compute), so DDP's bucketed all-reduce runs on fp32
gradients and the optimizer updates fp32 master weights.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scd_train.config import Config
from scd_train.parallel.backend import TrainingBackend
from scd_train.parallel.runtime import Runtime


class DDPBackend(TrainingBackend):
    name = "ddp"

    def __init__(self, model: nn.Module, param_groups: list[dict], cfg: Config, runtime: Runtime) -> None:
        super().__init__(model, param_groups, cfg, runtime)
        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters here, so every rank starts from the same weights.
        self.module = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.module.no_sync()
