"""The training loop: composes config -> model -> backend -> data -> loop, for every backend."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from scd_train.checkpoint import CONFIG, CheckpointManager, capture_rng
from scd_train.config import Config, ConfigError, to_dict
from scd_train.data import Batch, build_train_loader
from scd_train.diffusion.objective import build_objective
from scd_train.ema import EMA
from scd_train.errors import RunFailure
from scd_train.metrics.flops import StepFlops, detect_peak_tflops, tokens_per_frame, train_step_flops
from scd_train.metrics.loggers import JsonlWriter, Progress, WandbRun
from scd_train.metrics.throughput import ThroughputMeter
from scd_train.models import build_model
from scd_train.optim import apply_group_settings, build_param_groups, check_learning_rates, set_learning_rates
from scd_train.parallel.backend import build_backend
from scd_train.parallel.runtime import Runtime, init_runtime
from scd_train.precision import prepare_fp8
from scd_train.resume import claim_run_dir, record_start, restore
from scd_train.resume_policy import Change, tensor_shapes
from scd_train.stopping import STOP_SIGNALS, StopControl, launcher_ancestors
from scd_train.weights import load_initial_weights

log = logging.getLogger("scd_train")

__all__ = ["STOP_SIGNALS", "NonFiniteError", "TrainResult", "TrainState", "Trainer"]


class NonFiniteError(RunFailure):
    """Loss or gradient norm became NaN/Inf; nothing from this step is applied or saved."""


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    nonfinite_skips: int = 0
    wandb_run_id: str | None = None


@dataclass
class TrainResult:
    status: str  # "finished" or "stopped" (a stop signal saved a checkpoint and ended the run)
    step: int
    run_dir: Path
    losses: list[tuple[int, float]] = field(default_factory=list)


def clip_frames_for_step(cfg: Config, step: int) -> int:
    """Frames trained on at ``step``; identical on every rank (seeded by step, not by rank)."""
    low = cfg.data.random_clip_min_frames
    if low is None:
        return cfg.data.clip_frames
    return int(np.random.default_rng([cfg.data.seed, step, 7]).integers(low, cfg.data.clip_frames + 1))


def seed_everything(seed: int, rank: int) -> None:
    import random

    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + 1000003 * rank)


class TrainingStage:
    """What a run trains: the model the loop builds, the objective it minimises and that
    objective's cost. This default is plain training; another stage (distillation) passes its own
    to ``Trainer(cfg, stage=...)`` and gets the same backends, checkpoints, logging and resume."""

    def check(self, cfg: Config) -> None:
        """Refuse a config this stage cannot train, before anything touches the run directory."""
        if cfg.distill.teacher is not None:
            raise ConfigError(f"distill.teacher={cfg.distill.teacher!r} is set: this is a distillation run, "
                              "which scd-distill trains")

    def build_model(self, cfg: Config, resuming: bool) -> torch.nn.Module:
        """The model with its starting weights; a resume's weights come from the checkpoint."""
        model = build_model(cfg.model)
        if cfg.train.init_from and not resuming:
            load_initial_weights(model, cfg.train.init_from)  # plain weights, before any FP8 module swap
        return model

    def build_objective(self, cfg: Config):
        return build_objective(cfg.model, cfg.diffusion)

    def step_flops(self, cfg: Config, clip_frames: int) -> StepFlops:
        return train_step_flops(cfg, clip_frames)


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime | None = None, stage: TrainingStage | None = None) -> None:
        self.cfg = cfg
        t = cfg.train
        self.stage = stage or TrainingStage()
        self.stage.check(cfg)
        self.runtime = runtime or init_runtime(t.device, t.collective_timeout_s / 60, t.rendezvous_timeout_s)
        self.run_dir = Path(t.run_dir)
        # Nothing is written into the run directory before it is ours and the resume is known to be sound.
        self._lock = claim_run_dir(t, self.runtime)
        _configure_logging(self.run_dir, self.runtime.is_main)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", t.keep_checkpoints, self.runtime)
        resume_from = self.checkpoints.find_resumable(set_aside_damaged=True) if t.resume else None
        seed_everything(cfg.train.seed, 0)  # the same initial weights on every rank and world size
        model = self.stage.build_model(cfg, resuming=resume_from is not None)
        self.tensor_shapes = tensor_shapes(model.named_parameters())
        self.fp8 = prepare_fp8(model, cfg, self.runtime)  # before the backend wraps or shards it
        self.backend = build_backend(model, build_param_groups(model, cfg.optim), cfg, self.runtime)
        seed_everything(cfg.train.seed, self.runtime.rank)
        self.ema = EMA(self.backend.ema_parameters(), cfg.optim.ema_decay)
        self.objective = self.stage.build_objective(cfg)
        self.loader = build_train_loader(cfg, self.runtime.rank, self.runtime.world_size)
        self.state = TrainState()
        self.resumed_from: Path | None = None
        self.config_changes: list[Change] = []
        if resume_from is not None:
            restored = restore(resume_from, self.checkpoints, cfg, self.runtime, self.backend, self.ema, self.loader,
                               self.tensor_shapes, lambda step: seed_everything(t.seed + step, self.runtime.rank))
            saved = restored.trainer_state
            self.state = TrainState(**{k: saved[k] for k in asdict(TrainState()) if k in saved})
            self.resumed_from, self.config_changes = restored.path, restored.changes
            log.info("resumed from %s at step %d", restored.path, self.state.step)
            _log_window_change(saved, cfg, restored.path)
        self._apply_optimizer_config()
        self.discarded_records = record_start(cfg, self.runtime, self.state.step,
                                              restored if resume_from is not None else None, self.checkpoints.skipped)
        self.stop = StopControl(t.stop_grace_s, self._where)
        self.wandb = None
        self.metrics_file = None
        _log_window(cfg)

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    # -- set-up --------------------------------------------------------------------------------
    def _apply_optimizer_config(self) -> None:
        """The config's rates and hyper-parameters in every optimizer group, whatever a checkpoint restored."""
        changed = apply_group_settings(self.backend.optimizer, self.cfg.optim)
        for name, (before, after) in changed.items():
            log.warning("optimizer group '%s': base learning rate %.3e from the checkpoint -> %.3e from the config "
                        "(optim.lr x ratio), applied from step %d on", name, before, after, self.state.step)
        set_learning_rates(self.backend.optimizer, self.state.step, self.cfg.optim)
        check_learning_rates(self.backend.optimizer, self.state.step, self.cfg.optim)

    def _open_loggers(self) -> None:
        if not self.runtime.is_main:
            return
        self.metrics_file = JsonlWriter(self.run_dir / "metrics.jsonl")
        log_cfg = self.cfg.log
        run_id = self.state.wandb_run_id
        if run_id is not None and self.discarded_records:
            # wandb cannot rewind a run: the repeated steps would keep the discarded values there
            log.warning("wandb run %s holds steps after %d from training this resume repeats; logging to a new "
                        "wandb run (the old one stays as it is)", run_id, self.state.step)
            run_id = None
        self.wandb = WandbRun(log_cfg.wandb, self.run_dir, log_cfg.wandb_project,
                              log_cfg.wandb_name or self.run_dir.name, to_dict(self.cfg), run_id)
        self.state.wandb_run_id = self.wandb.run_id

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        self._open_loggers()
        self.runtime.barrier()
        self.state.wandb_run_id = self.runtime.broadcast_object(self.state.wandb_run_id)
        meter = ThroughputMeter(self.runtime.world_size, tokens_per_frame(cfg.model),
                                cfg.log.peak_tflops or detect_peak_tflops(self.runtime.device))
        progress = Progress(cfg.log.progress_bar and self.runtime.is_main, cfg.train.steps, self.state.step)
        batches = iter(self.loader)
        losses: list[tuple[int, float]] = []
        window: list[torch.Tensor] = []
        status = "finished"
        self.stop.watch = launcher_ancestors()
        with self.stop:
            while self.state.step < cfg.train.steps:
                record = self._train_step(batches, meter, window)
                self.stop.reached_boundary()
                progress.update()
                if self._due(cfg.log.every) or self.state.step == cfg.train.steps:
                    record.update(self._window_metrics(meter, window))
                    losses.append((self.state.step, record["loss"]))
                    self._log(record, progress)
                # After logging: the stop checkpoint includes this step, so a resumed run must not lose its
                # record. A stop at the last step is a finish (its final save follows), never a requeue.
                if self.state.step < cfg.train.steps and self.runtime.any_true(self.stop_requested):
                    self.save()
                    status = "stopped"
                    break
                if self._due(cfg.train.checkpoint_every) or self.state.step == cfg.train.steps:
                    self.save()
        progress.close()
        self._close_loggers()
        if self._lock is not None:
            self._lock.release()
        return TrainResult(status, self.state.step, self.run_dir, losses)

    def _train_step(self, batches: Iterator[Batch], meter: ThroughputMeter, window: list) -> dict:
        cfg, step = self.cfg, self.state.step
        lrs = set_learning_rates(self.backend.optimizer, step, cfg.optim)
        frames = clip_frames_for_step(cfg, step)
        loss_sum, keys, wait, clips = torch.zeros((), device=self.runtime.device), [], 0.0, 0
        for micro in range(cfg.train.grad_accum):
            start = time.perf_counter()
            batch = next(batches).truncate(frames).to(self.runtime.device)
            wait += time.perf_counter() - start
            keys.extend(batch.keys)
            clips += batch.latents.shape[0]
            last = micro == cfg.train.grad_accum - 1
            with contextlib.nullcontext() if last else self.backend.no_sync():
                with self.backend.autocast(), self.fp8.autocast():
                    out = self.objective(self.backend.module, batch.latents, batch.actions)
                self.backend.backward(out.loss / cfg.train.grad_accum)
            loss_sum = loss_sum + out.loss.detach().float()
        loss = loss_sum / cfg.train.grad_accum
        grad_norm = self.backend.clip_grad_norm(cfg.optim.grad_clip)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        self._handle_nonfinite(finite, loss, grad_norm, keys)
        meter.add_step(clips, frames, self.stage.step_flops(cfg, frames), wait)
        self.state.step += 1
        self.state.samples_seen += clips * self.runtime.world_size
        window.append(loss)
        return {"step": self.state.step, "grad_norm": float(grad_norm), "clip_frames": frames,
                **{f"lr/{name}": lr for name, lr in lrs.items()}}

    def _handle_nonfinite(self, finite: bool, loss, grad_norm, keys: list[str]) -> None:
        bad_anywhere = self.runtime.any_true(not finite)
        if not bad_anywhere:
            self.backend.step()
            self.ema.update()
            return
        self.backend.skip_step()
        mine = None if finite else (f"step {self.state.step}, rank {self.runtime.rank}: loss={float(loss)}, "
                                    f"grad_norm={float(grad_norm)}, samples {keys[:8]}")
        # every rank gets every bad rank's account, so the one message rank 0 prints names them all
        where = "; ".join(r for r in self.runtime.all_gather_object(mine) if r)
        if self.cfg.train.on_nonfinite == "skip" and self.state.nonfinite_skips < self.cfg.train.max_nonfinite_skips:
            self.state.nonfinite_skips += 1
            log.warning("non-finite update skipped (%d of at most %d) at %s", self.state.nonfinite_skips,
                        self.cfg.train.max_nonfinite_skips, where)
            return
        raise NonFiniteError(f"non-finite loss or gradient norm at {where}; the update was not applied and "
                             "nothing was saved (train.on_nonfinite=skip with train.max_nonfinite_skips=N skips "
                             "up to N such steps)")

    def _window_metrics(self, meter: ThroughputMeter, window: list) -> dict:
        loss = torch.stack(window).mean()
        if self.runtime.distributed:
            import torch.distributed as dist

            loss = loss.to(self.runtime.collective_device)
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        window.clear()
        record = {"loss": float(loss), "samples_seen": self.state.samples_seen, **meter.window()}
        record["memory/peak_gb"] = _peak_memory_gb(self.runtime.device)
        return record

    def _log(self, record: dict, progress: Progress) -> None:
        if not self.runtime.is_main:
            return
        self.metrics_file.write(record)
        self.wandb.log(record, step=record["step"])
        lr_text = " ".join(f"{k[3:]}={v:.2e}" for k, v in record.items() if k.startswith("lr/"))
        progress.show({"loss": f"{record['loss']:.4f}", "lr": lr_text,
                       "frames/s": f"{record['perf/latent_frames_per_s']:.1f}"})

    def _due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    # -- stopping and saving -------------------------------------------------------------------
    def _where(self) -> str:
        complete = self.checkpoints.complete_checkpoints() if self.runtime.is_main else []
        newest = complete[-1].name if complete else "none"
        return f"the run is at step {self.state.step}, its newest complete checkpoint is {newest}"

    def save(self) -> Path:
        if not self._parameters_finite():
            raise NonFiniteError(f"refusing to checkpoint non-finite parameters at step {self.state.step}")
        rank_state = {"rng": capture_rng(), "data": self.loader.state_dict()}
        trainer_state = {**asdict(self.state), "world_size": self.runtime.world_size,
                         "backend": self.cfg.train.backend, "time": time.time(), "model_tensors": self.tensor_shapes,
                         "attention_window": _attention_window(self.cfg)}
        config_text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        with self.stop.saving():
            path = self.checkpoints.save(self.state.step, self.backend, self.ema, trainer_state, rank_state,
                                         texts={CONFIG: config_text})
        log.info("saved checkpoint %s", path)
        return path

    def _parameters_finite(self) -> bool:
        return not self.runtime.any_true(not self.backend.local_parameters_finite())

    def _close_loggers(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _attention_window(cfg: Config) -> dict:
    return {"encoder_window": cfg.model.encoder_window, "encoder_sink_frames": cfg.model.encoder_sink_frames}


def _log_window_change(trainer_state: dict, cfg: Config, path: Path) -> None:
    """A checkpoint may continue under another window (e.g. a full-history model fine-tuned to a
    window): allowed, and said in the log. Checkpoints from before windows existed had none."""
    before = trainer_state.get("attention_window", {"encoder_window": None, "encoder_sink_frames": 0})
    now = _attention_window(cfg)
    if before != now:
        log.warning("checkpoint %s was trained with model.encoder_window=%s, model.encoder_sink_frames=%s; "
                    "training continues with model.encoder_window=%s, model.encoder_sink_frames=%s, so the "
                    "encoder's attention pattern changes from step %d on", path, before["encoder_window"],
                    before["encoder_sink_frames"], now["encoder_window"], now["encoder_sink_frames"],
                    trainer_state.get("step", 0))


def _log_window(cfg: Config) -> None:
    w, s, frames = cfg.model.encoder_window, cfg.model.encoder_sink_frames, cfg.data.clip_frames
    if w is None:
        return
    log.info("windowed encoder: each frame attends to its own frame, the %d before it and %d sink frame(s)",
             w - 1, s)
    if w + s > frames:
        log.warning("model.encoder_window=%d + model.encoder_sink_frames=%d exceeds data.clip_frames=%d: training "
                    "clips never fill the window, so streams past %d frames meet frame distances training never "
                    "showed; use clips of at least %d frames", w, s, frames, frames, w + s)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted: test runners and notebooks
    replace it, and a handler holding the first one would write into a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


def _configure_logging(run_dir: Path, is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger("scd_train")
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    path = str((run_dir / "train.log").resolve())
    for old in [h for h in root.handlers if getattr(h, "baseFilename", path) != path]:
        root.removeHandler(old)  # an earlier run in this process must not receive this run's log
        old.close()
    if is_main and not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        root.addHandler(logging.FileHandler(path))
