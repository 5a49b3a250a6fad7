"""Carrying a run's data position over to a different world size (used when DCP reshards)."""

from __future__ import annotations

import math

from scd_train.errors import ResumeError

POSITION_KEYS = {"epoch", "batch_in_epoch", "batch_size", "world_size"}


def reshard_loader_state(state: dict, new_world_size: int) -> dict:
    """Map a rank-split epoch position to ``new_world_size`` ranks.

    The position is converted to clips consumed in the epoch across all ranks, rounded up to whole
    batches of the new layout so no clip is seen twice in the epoch (a few may be skipped).
    """
    missing = POSITION_KEYS - set(state)
    if missing:
        raise ResumeError(f"this data loader's position ({sorted(state)}) cannot be carried from "
                         f"{state.get('world_size', '?')} to {new_world_size} ranks; resume with the old world size")
    consumed = state["batch_in_epoch"] * state["batch_size"] * state["world_size"]
    batch_in_epoch = math.ceil(consumed / (state["batch_size"] * new_world_size))
    return {**state, "world_size": new_world_size, "batch_in_epoch": batch_in_epoch}
