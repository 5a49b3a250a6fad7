"""Atomic, sharded checkpoints with a completion marker and a ``latest`` pointer.

Layout of ``<run_dir>/checkpoints``::

    step_00000500/            a complete checkpoint
      state/                  model, optimizer and EMA (DCP shards, or DeepSpeed's files)
      rank_00000.pt           per-rank RNG states and data position
      trainer_state.json      step, samples seen, world size, logger run id, tensor shapes, ...
      config.yaml             the resolved config that trained up to this step
      COMPLETE                written last: step, world size and a manifest (size + SHA-256) of every file
    step_00001000.partial/    a save in progress (or killed): never loaded
    step_00000750.damaged/    a complete checkpoint whose files no longer match their manifest
    latest                    name of the newest complete checkpoint, replaced atomically (for people
                              and scripts: resuming never depends on it)

A save writes into ``.partial``, waits for every rank, hashes the files, marks the directory
complete, renames it, then moves ``latest``. Resuming takes the newest complete checkpoint whose
files match their manifest, skipping (and, in training, renaming to ``.damaged``) any that do not,
with a warning that names the damaged file. Retention deletes only complete checkpoints older than
the one just written.
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

from scd_train.checkpoint_integrity import check_files, digest_files, file_digest, list_files, share_of
from scd_train.errors import InputError, ResumeError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
DAMAGED_SUFFIX = ".damaged"


class DamagedCheckpointError(InputError, FileNotFoundError):
    """No checkpoint can be used: each one's files differ from what was written (named per file)."""


class LocalRuntime:
    """Rank 0 of 1 without a process group: for single-process readers (sampling, export, tools)."""

    rank, world_size, is_main, distributed = 0, 1, True, False

    def barrier(self) -> None: ...


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
    """Marked complete, and neither an unfinished (``.partial``) nor a set-aside (``.damaged``) one."""
    return "." not in path.name and (path / COMPLETE).is_file()


def read_marker(path: Path) -> dict:
    """The completion marker of ``path`` (step, world size, file manifest); raises ValueError when unreadable."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"its {COMPLETE} marker is unreadable ({exc})") from None
    if not isinstance(marker, dict):
        raise ValueError(f"its {COMPLETE} marker is not a JSON object")
    return marker


def verify_checkpoint(path: Path) -> list[str]:
    """Everything wrong with checkpoint ``path`` (empty when its files match its manifest), in one process."""
    return CheckpointManager(path.parent, keep=1).verify(path)


def _collective(runtime) -> bool:
    return bool(getattr(runtime, "distributed", False))


class CheckpointManager:
    def __init__(self, root: Path | str, keep: int, runtime=None) -> None:
        self.root = Path(root)
        self.keep = keep
        self.runtime = runtime if runtime is not None else LocalRuntime()
        # (checkpoint, problems) of every damaged checkpoint passed over so far
        self.skipped: list[tuple[Path, list[str]]] = []

    # -- collectives that degrade to local calls without a process group ------------------------
    def _broadcast(self, obj):
        return self.runtime.broadcast_object(obj) if _collective(self.runtime) else obj

    def _gather(self, obj) -> list:
        return self.runtime.all_gather_object(obj) if _collective(self.runtime) else [obj]

    def save(self, step: int, backend, ema, trainer_state: dict, rank_state: dict,
             texts: dict[str, str] | None = None) -> Path:
        """Every rank calls this at the same step boundary; ``texts`` are extra files rank 0 writes
        into the checkpoint (e.g. the resolved config)."""
        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        if self.runtime.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.runtime.barrier()
        backend.save(partial, ema)
        atomic_torch_save(rank_state, partial / rank_file(self.runtime.rank))
        self.runtime.barrier()
        # every rank hashes its share of what all ranks wrote; rank 0 records the union
        names = list_files(partial)
        shares = self._gather(digest_files(partial, share_of(names, self.runtime.rank, self.runtime.world_size)))
        if self.runtime.is_main:
            digests = {name: d for share in shares for name, d in share.items()}
            self._finalize(partial, final, step, trainer_state, digests, texts or {})
        self.runtime.barrier()
        return final

    def _finalize(self, partial: Path, final: Path, step: int, trainer_state: dict, digests: dict[str, dict],
                  texts: dict[str, str]) -> None:
        atomic_write_text(partial / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        for name, text in texts.items():
            atomic_write_text(partial / name, text)
        # files this rank's listing shows that no share covered (listings can lag on network file systems)
        for name in list_files(partial, exclude=[*digests, COMPLETE]):
            digests[name] = file_digest(partial / name)
        marker = {"step": step, "world_size": self.runtime.world_size, "time": time.time(),
                  "files": dict(sorted(digests.items()))}
        atomic_write_text(partial / COMPLETE, json.dumps(marker, indent=1))
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name)
        self.prune(just_written=step)

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and is_complete(p)]
        return sorted(found, key=step_of)

    def prune(self, just_written: int | None = None) -> None:
        """Keep the ``keep`` newest complete checkpoints up to the one just written; never touch a
        higher step (only another run could have written it, and it is not ours to delete)."""
        complete = self.complete_checkpoints()
        if just_written is not None:
            complete = [p for p in complete if step_of(p) <= just_written]
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        newest = step_of(complete[-1]) if complete else -1
        for stale in self.root.glob("step_*.partial"):
            if step_of(stale) < newest:
                shutil.rmtree(stale, ignore_errors=True)

    def _candidates(self) -> list[Path]:
        """Complete checkpoints, newest first, whatever ``latest`` says (a kill between the rename and
        the pointer update leaves it one behind); newer unfinished saves are named and skipped."""
        complete = self.complete_checkpoints()
        newest = step_of(complete[-1]) if complete else -1
        for p in sorted(self.root.glob("step_*.partial"), key=step_of) if self.root.is_dir() else []:
            if step_of(p) > newest:
                log.warning("skipping incomplete checkpoint %s (a save that never finished: no %s marker)",
                            p, COMPLETE)
        for p in sorted(self.root.glob("step_*"), key=step_of) if self.root.is_dir() else []:
            if p.is_dir() and "." not in p.name and not (p / COMPLETE).is_file() and step_of(p) > newest:
                log.warning("skipping incomplete checkpoint %s (no %s marker)", p, COMPLETE)
        return complete[::-1]

    def verify(self, path: Path) -> list[str]:
        """What is wrong with ``path`` against its manifest (empty: intact). Collective: every rank
        calls it and checks its share of the files."""
        marker = None
        if self.runtime.is_main:
            try:
                marker = read_marker(path)
            except ValueError as exc:
                marker = {"error": str(exc)}
        marker = self._broadcast(marker)
        if "error" in marker:
            return [marker["error"]]
        files = marker.get("files")
        if files is None:
            if self.runtime.is_main:
                log.warning("checkpoint %s has no file manifest (written by an older version): loading it "
                            "unverified", path)
            return []
        mine = share_of(sorted(files), self.runtime.rank, self.runtime.world_size)
        return sorted(p for share in self._gather(check_files(path, files, mine)) for p in share)

    def find_resumable(self, set_aside_damaged: bool = False) -> Path | None:
        """The newest complete checkpoint whose files are intact. Damaged ones are skipped with a
        warning naming what is wrong (and renamed ``*.damaged`` when ``set_aside_damaged``); when
        every complete checkpoint is damaged, DamagedCheckpointError names them all (and any skipped
        before by this manager)."""
        for path in self._broadcast(self._candidates() if self.runtime.is_main else None):
            problems = self.verify(path)
            if not problems:
                if self.skipped and self.runtime.is_main:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                return path
            self.skipped.append((path, problems))
            if self.runtime.is_main:
                log.warning("checkpoint %s is damaged and is skipped: %s", path, "; ".join(problems[:5]))
                if set_aside_damaged:
                    self.set_aside(path)
        if self.skipped:
            detail = " | ".join(f"{p.name}: {'; '.join(problems[:3])}" for p, problems in self.skipped)
            raise DamagedCheckpointError(
                f"every complete checkpoint under {self.root} is damaged ({detail}); restore the files, or "
                "start over in another train.run_dir")
        return None

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint so that it is never a candidate again (its files stay for inspection)."""
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.rename(path, target)
        return target

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
        # a load that fails (damaged files) raises as it is: resume.restore falls back to an older checkpoint
        backend.load(path, ema)
        if saved_world != world:
            log.warning("checkpoint %s was written by %d ranks; resharded onto %d", path, saved_world, world)
            return trainer_state, None
        rank_state = torch.load(path / rank_file(self.runtime.rank), weights_only=False)
        return trainer_state, rank_state
