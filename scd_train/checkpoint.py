"""Atomic, sharded checkpoints with a completion marker and a ``latest`` pointer.

Layout of ``<run_dir>/checkpoints``::

    step_00000500/            a complete checkpoint
      state/                  model, optimizer and EMA (DCP shards, or DeepSpeed's files)
      rank_00000.pt           per-rank RNG states and data position
      trainer_state.json      step, samples seen, world size, logger run id, ...
      COMPLETE                written last, after every rank has written
    step_00001000.partial/    a save in progress (or killed): never loaded
    latest                    name of the newest complete checkpoint, replaced atomically

A save writes into ``.partial``, waits for every rank, marks it complete, renames it, then moves
``latest``. Retention deletes only complete checkpoints older than the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from scd_train.errors import ResumeError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and not path.name.endswith(".partial")


class CheckpointManager:
    def __init__(self, root: Path | str, keep: int, runtime) -> None:
        self.root = Path(root)
        self.keep = keep
        self.runtime = runtime

    def save(self, step: int, backend, ema, trainer_state: dict, rank_state: dict) -> Path:
        """Every rank calls this at the same step boundary."""
        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        if self.runtime.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.runtime.barrier()
        backend.save(partial, ema)
        atomic_torch_save(rank_state, partial / rank_file(self.runtime.rank))
        self.runtime.barrier()
        if self.runtime.is_main:
            self._finalize(partial, final, step, trainer_state)
        self.runtime.barrier()
        return final

    def _finalize(self, partial: Path, final: Path, step: int, trainer_state: dict) -> None:
        atomic_write_text(partial / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        marker = {"step": step, "world_size": self.runtime.world_size, "time": time.time()}
        atomic_write_text(partial / COMPLETE, json.dumps(marker))
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name)
        self.prune()

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and is_complete(p)]
        return sorted(found, key=step_of)

    def prune(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        newest = step_of(complete[-1]) if complete else -1
        for stale in self.root.glob("step_*.partial"):
            if step_of(stale) < newest:
                shutil.rmtree(stale, ignore_errors=True)

    def find_resumable(self) -> Path | None:
        """The newest complete checkpoint; incomplete ones are skipped with a warning."""
        pointer = self.root / LATEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named.is_dir() and is_complete(named):
                newer = [p for p in self.root.glob("step_*") if p.is_dir() and step_of(p) > step_of(named)]
                for p in newer:
                    log.warning("skipping incomplete checkpoint %s (no %s marker)", p, COMPLETE)
                return named
        complete = self.complete_checkpoints()
        for p in self.root.glob("step_*") if self.root.is_dir() else []:
            if p.is_dir() and not is_complete(p) and (not complete or step_of(p) > step_of(complete[-1])):
                log.warning("skipping incomplete checkpoint %s (no %s marker)", p, COMPLETE)
        return complete[-1] if complete else None

    def load(self, path: Path, backend, ema) -> tuple[dict, dict | None]:
        """Restore backend state and EMA; returns (trainer_state, this rank's state).

        The rank state is None when the checkpoint was written by another world size and the
        backend resharded the model (per-rank RNG and data position then do not carry over).
        """
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        saved_world = trainer_state["world_size"]
        world = self.runtime.world_size
        if saved_world != world and not backend.supports_reshard:
            raise ResumeError(
                f"checkpoint {path} was written by {saved_world} ranks but this run has {world}; "
                f"train.backend={backend.name!r} cannot reshard it: resume with {saved_world} ranks, or export "
                "the weights (scd-export) and start a new run from them with train.init_from")
        try:
            backend.load(path, ema)
            if saved_world != world:
                log.warning("checkpoint %s was written by %d ranks; resharded onto %d", path, saved_world, world)
                return trainer_state, None
            rank_state = torch.load(path / rank_file(self.runtime.rank), weights_only=False)
        except ResumeError:
            raise
        # DCP reports damaged files and a model that changed shape as CheckpointException, a BaseException
        except (Exception, CheckpointException) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ResumeError(f"checkpoint {path} cannot be resumed by this run ({type(exc).__name__}: {first}); "
                              "it is damaged or was written with another model config: restore the run's config, "
                              "move the checkpoint aside to resume from an earlier one, or set train.resume=false "
                              "in a new train.run_dir") from exc
        return trainer_state, rank_state
