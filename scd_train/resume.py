"""Starting a run in its directory: claim it, pick and restore the checkpoint, record the start.

The trainer calls these in order; together they keep the contract of ``scd_train.run_dir`` and
``scd_train.resume_policy``: nothing is written into the run directory before it is this run's and
the resume is known to be sound, a checkpoint that fails to load is set aside for the next older
intact one, and every start records what it is and what it continued.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from scd_train.checkpoint import (
    CONFIG,
    TRAINER_STATE,
    CheckpointManager,
    DamagedCheckpointError,
    rank_file,
    restore_rng,
)
from scd_train.config import Config, TrainConfig, dump_yaml, to_dict
from scd_train.env import environment_report
from scd_train.errors import ScdError
from scd_train.parallel.reshard import reshard_loader_state
from scd_train.resume_policy import Change, check_resume
from scd_train.run_dir import (
    RunDirLock,
    acquire_lock,
    append_resume_record,
    discard_records_after,
    prepare_fresh_start,
)

log = logging.getLogger("scd_train")


def claim_run_dir(train: TrainConfig, runtime) -> RunDirLock | None:
    """Rank 0 locks ``train.run_dir`` and, for a fresh start, makes sure no earlier run is in it
    (every rank raises when it cannot)."""
    run_dir = Path(train.run_dir)
    holder: list[RunDirLock | None] = [None]

    def claim() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        holder[0] = acquire_lock(run_dir, train.run_dir_lock_wait_s)
        if not train.resume:
            prepare_fresh_start(run_dir, train.on_used_run_dir)

    runtime.on_main(claim)
    return holder[0]


@dataclass
class Restored:
    """What a resume continued: the checkpoint, its trainer state and the settings that changed."""

    path: Path
    trainer_state: dict
    changes: list[Change] = field(default_factory=list)


def _read_saved(path: Path, run_dir: Path) -> tuple[dict, dict | None]:
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    for source in (path / CONFIG, run_dir / CONFIG):  # older checkpoints carry no config of their own
        if source.is_file():
            return trainer_state, yaml.safe_load(source.read_text())
    return trainer_state, None


def restore(path: Path, checkpoints: CheckpointManager, cfg: Config, runtime, backend, ema, loader,
            tensor_shapes: dict[str, list[int]], reseed: Callable[[int], None]) -> Restored:
    """Check ``path`` against this run's settings, then load it into ``backend``, ``ema`` and ``loader``
    (every rank the same checkpoint). One that fails to load is set aside and the next older intact one
    is tried, so a requeued job does not crash-loop on one damaged save. ``reseed(step)`` re-seeds the
    ranks when the checkpoint came from another world size (its per-rank RNG does not carry over)."""
    run_dir = Path(cfg.train.run_dir)

    def check(p: Path) -> tuple[list[Change], dict | None, str | None]:
        try:
            trainer_state, saved_config = _read_saved(p, run_dir)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            return [], None, f"{type(exc).__name__}: {exc}"
        changes = check_resume(str(p), saved_config, to_dict(cfg), trainer_state.get("model_tensors"), tensor_shapes,
                               trainer_state.get("world_size"), runtime.world_size, backend.supports_reshard)
        return changes, trainer_state, None

    while True:
        changes, trainer_state, problem = runtime.on_main(lambda p=path: check(p))
        if problem is None:
            problem = _load(path, checkpoints, runtime, backend, ema, loader, reseed)
        if problem is None:
            break
        if runtime.is_main:
            log.warning("checkpoint %s could not be loaded (%s): set aside, trying the next older one", path, problem)
            checkpoints.set_aside(path)
        checkpoints.skipped.append((path, [problem]))
        failed, path = path, checkpoints.find_resumable(set_aside_damaged=True)
        if path is None:
            raise DamagedCheckpointError(f"checkpoint {failed} could not be loaded ({problem}) and no older intact "
                                         f"checkpoint is left under {checkpoints.root}")
    for change in changes:
        log.warning("resuming with a changed setting: %s", change.line())
    return Restored(path, trainer_state, changes)


def _load(path: Path, checkpoints: CheckpointManager, runtime, backend, ema, loader,
          reseed: Callable[[int], None]) -> str | None:
    """Restore everything from ``path``; None on success, else what failed (agreed by all ranks)."""
    problem = None
    try:
        trainer_state, rank_state = checkpoints.load(path, backend, ema)
        if rank_state is None:  # resharded onto another world size
            saved = torch.load(path / rank_file(0), weights_only=False)["data"]
            loader.load_state_dict(reshard_loader_state(saved, runtime.world_size))
            reseed(trainer_state["step"])
        else:
            loader.load_state_dict(rank_state["data"])
            restore_rng(rank_state["rng"])
    except ScdError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        problem = f"rank {runtime.rank}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    problems = [p for p in runtime.all_gather_object(problem) if p]
    return "; ".join(problems) if problems else None


def record_start(cfg: Config, runtime, step: int, restored: Restored | None,
                 skipped: list[tuple[Path, list[str]]]) -> int:
    """Write what this run is (config, environment), move metrics of steps it repeats aside and note the
    resume; returns how many metrics records were moved."""
    run_dir = Path(cfg.train.run_dir)
    changes = restored.changes if restored is not None else []

    def record() -> int:
        dump_yaml(cfg, run_dir / "config.yaml")
        (run_dir / "env.json").write_text(json.dumps(environment_report(), indent=2))
        discarded = discard_records_after(run_dir, step)
        if restored is not None or skipped or discarded:
            append_resume_record(run_dir, {
                "step": step, "checkpoint": str(restored.path) if restored else None,
                "skipped_damaged": {str(p): problems for p, problems in skipped},
                "changed": {c.key: {"checkpoint": c.saved, "now": c.now} for c in changes},
                "discarded_metrics_records": discarded})
        return discarded

    return runtime.on_main(record)
