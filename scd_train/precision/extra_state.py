"""Module ``_extra_state`` (Transformer Engine's FP8 scaling state) through DCP checkpoints.

TE serialises a module's FP8 metadata (recipe, scales, amax history) into a uint8 tensor whose
size changes with the recipe and is 0 before the first FP8 step. DCP loads tensors in place, so
loading a saved state into a fresh module fails on the size. Here every ``*._extra_state`` tensor
travels as an opaque bytes object instead, which DCP stores whole and hands back whole.

Loading a checkpoint that has no such entry (FP8 switched on at resume) keeps the module's
current, fresh state: TE recalibrates its scales from the first steps.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

SUFFIX = "_extra_state"
# Recent TE refuses to unpickle delayed-scaling state unless this is set (the pickle could run code).
TE_UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def _is_extra(key: str) -> bool:
    return key == SUFFIX or key.endswith("." + SUFFIX)


def _to_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value.detach().cpu() if isinstance(value, torch.Tensor) else value, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes):
    # The payload was written by this module from our own checkpoint; TE's state holds its
    # recipe object, which weights_only loading would reject.
    return torch.load(io.BytesIO(blob), weights_only=False)


def pack_extra_state(model_sd: dict) -> dict:
    """The model state dict with every extra state replaced by its serialised bytes."""
    return {k: (_to_bytes(v) if _is_extra(k) else v) for k, v in model_sd.items()}


def extra_state_keys(model_sd: dict) -> list[str]:
    return [k for k in model_sd if _is_extra(k)]


def load_request(model_sd: dict, checkpoint_id: str | Path, prefix: str = "model.") -> tuple[dict, dict]:
    """(state to ask DCP for, current extra states the checkpoint lacks and that stay as they are)."""
    keys = extra_state_keys(model_sd)
    if not keys:
        return model_sd, {}
    stored = dcp.FileSystemReader(str(checkpoint_id)).read_metadata().state_dict_metadata
    missing = {k: model_sd[k] for k in keys if prefix + k not in stored}
    if missing:
        log.warning("checkpoint %s has no FP8 scaling state for %d modules (saved without FP8?); they start "
                    "fresh and recalibrate", checkpoint_id, len(missing))
    request = {k: (b"" if _is_extra(k) else v) for k, v in model_sd.items() if k not in missing}
    return request, missing


def unpack_extra_state(loaded: dict, kept: dict) -> dict:
    """Loaded model state with extra states deserialised and the kept ones put back."""
    out = {k: (_from_bytes(v) if _is_extra(k) and isinstance(v, bytes) else v) for k, v in loaded.items()}
    out.update(kept)
    return out


@contextlib.contextmanager
def trusted_extra_state():
    """Let TE load FP8 state from a checkpoint this framework wrote into the run directory.

    The run's own checkpoints are trusted exactly as far as its per-rank files, which are loaded
    with ``weights_only=False``; the permission ends with the load.
    """
    previous = os.environ.get(TE_UNSAFE_PICKLE_ENV)
    os.environ[TE_UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[TE_UNSAFE_PICKLE_ENV]
        else:
            os.environ[TE_UNSAFE_PICKLE_ENV] = previous
