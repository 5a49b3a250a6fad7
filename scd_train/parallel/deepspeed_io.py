"""Reading full fp32 weights out of a ZeRO-3 checkpoint in one process, at any world size."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scd_train.ema import canonical_name
from scd_train.errors import ResumeError
from scd_train.parallel.deepspeed_backend import CHECKPOINT_SUBDIR, TAG


def read_ema(directory: Path) -> dict[str, torch.Tensor]:
    """Concatenate every rank's EMA partition of each parameter (ZeRO-3 splits the flattened
    parameter evenly across ranks, padding the last) and restore the full shape."""
    files = sorted(directory.glob("ema_rank_*.pt"))
    if not files:
        raise ResumeError(f"no EMA partitions (ema_rank_*.pt) under {directory}")
    parts = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    world = parts[0]["world_size"]
    if len(parts) != world or sorted(p["rank"] for p in parts) != list(range(world)):
        raise ResumeError(f"{directory} holds {len(parts)} EMA partitions but was written by {world} ranks")
    parts.sort(key=lambda p: p["rank"])
    weights = {}
    for name, spec in parts[0]["layout"].items():
        flat = torch.cat([p["shards"][name].reshape(-1).float() for p in parts])
        weights[name] = flat[: spec["numel"]].view(spec["shape"]).clone()
    return weights


def read_raw(directory: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights, merged from the optimizer partitions by DeepSpeed's own tool."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
    return {canonical_name(k): v.float() for k, v in state.items()}


def ema_names(checkpoint: Path) -> set[str]:
    """Parameters the EMA partitions of ``checkpoint`` shadow (every trained one)."""
    files = sorted((Path(checkpoint) / "state" / CHECKPOINT_SUBDIR).glob("ema_rank_*.pt"))
    if not files:
        return set()
    return set(torch.load(files[0], map_location="cpu", weights_only=False)["layout"])


def read_weights(checkpoint: Path, model: nn.Module, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Full fp32 weights of ``checkpoint`` named like ``model.state_dict()`` (EMA or raw), as the
    DCP reader: only ``model``'s names (a checkpoint may also hold a frozen distillation teacher).
    With the EMA, parameters the run kept frozen (no shadow) come from the weights themselves."""
    directory = Path(checkpoint) / "state" / CHECKPOINT_SUBDIR
    weights = read_ema(directory) if use_ema else read_raw(directory)
    wanted = model.state_dict()
    weights = {n: w for n, w in weights.items() if n in wanted}
    frozen = [n for n, _ in model.named_parameters() if n not in weights]
    if use_ema and frozen:
        raw = read_raw(directory)
        weights.update({n: raw[n] for n in frozen if n in raw})
    expected = {n: p.shape for n, p in model.named_parameters()}
    for name, tensor in weights.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name]):
            raise ResumeError(f"{checkpoint}: weight {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name])}")
    return weights
