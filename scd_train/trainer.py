"""The training loop: composes config -> model -> backend -> data -> loop, for every backend."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from scd_train.checkpoint import CheckpointManager, capture_rng, rank_file, restore_rng
from scd_train.config import Config, ConfigError, dump_yaml, to_dict
from scd_train.data import Batch, build_train_loader
from scd_train.diffusion.objective import build_objective
from scd_train.ema import EMA
from scd_train.env import environment_report
from scd_train.metrics.flops import StepFlops, detect_peak_tflops, tokens_per_frame, train_step_flops
from scd_train.metrics.loggers import JsonlWriter, Progress, WandbRun
from scd_train.metrics.throughput import ThroughputMeter
from scd_train.models import build_model
from scd_train.optim import build_param_groups, check_learning_rates, set_learning_rates
from scd_train.parallel.backend import build_backend
from scd_train.parallel.reshard import reshard_loader_state
from scd_train.parallel.runtime import Runtime, init_runtime
from scd_train.precision import prepare_fp8
from scd_train.weights import load_initial_weights

log = logging.getLogger("scd_train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class NonFiniteError(RuntimeError):
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

    def build_model(self, cfg: Config) -> torch.nn.Module:
        if cfg.distill.teacher is not None:
            raise ConfigError(f"distill.teacher={cfg.distill.teacher!r} is set: this is a distillation run, "
                              "which scd-distill trains")
        model = build_model(cfg.model)
        if cfg.train.init_from:
            load_initial_weights(model, cfg.train.init_from)  # plain weights, before any FP8 module swap
        return model

    def build_objective(self, cfg: Config):
        return build_objective(cfg.model, cfg.diffusion)

    def step_flops(self, cfg: Config, clip_frames: int) -> StepFlops:
        return train_step_flops(cfg, clip_frames)


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime | None = None, stage: TrainingStage | None = None) -> None:
        self.cfg = cfg
        self.stage = stage or TrainingStage()
        self.runtime = runtime or init_runtime(cfg.train.device)
        self.run_dir = Path(cfg.train.run_dir)
        self._prepare_run_dir()
        seed_everything(cfg.train.seed, 0)  # the same initial weights on every rank and world size
        model = self.stage.build_model(cfg)
        self.fp8 = prepare_fp8(model, cfg, self.runtime)  # before the backend wraps or shards it
        self.backend = build_backend(model, build_param_groups(model, cfg.optim), cfg, self.runtime)
        seed_everything(cfg.train.seed, self.runtime.rank)
        self.ema = EMA(self.backend.ema_parameters(), cfg.optim.ema_decay)
        self.objective = self.stage.build_objective(cfg)
        self.loader = build_train_loader(cfg, self.runtime.rank, self.runtime.world_size)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_checkpoints, self.runtime)
        self.state = TrainState()
        self.resumed_from: Path | None = None
        if cfg.train.resume:
            self._resume()
        set_learning_rates(self.backend.optimizer, self.state.step, cfg.optim)
        check_learning_rates(self.backend.optimizer, self.state.step, cfg.optim)
        self.stop_requested = False
        self.wandb = None
        self.metrics_file = None

    # -- set-up --------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "env.json").write_text(json.dumps(environment_report(), indent=2))
        self.runtime.barrier()
        _configure_logging(self.run_dir, self.runtime.is_main)

    def _resume(self) -> None:
        path = self.runtime.broadcast_object(self.checkpoints.find_resumable())  # one choice for all ranks
        if path is None:
            return
        trainer_state, rank_state = self.checkpoints.load(path, self.backend, self.ema)
        self.state = TrainState(**{k: trainer_state[k] for k in asdict(TrainState()) if k in trainer_state})
        if rank_state is None:  # resharded onto another world size
            saved = torch.load(path / rank_file(0), weights_only=False)["data"]
            self.loader.load_state_dict(reshard_loader_state(saved, self.runtime.world_size))
            seed_everything(self.cfg.train.seed + self.state.step, self.runtime.rank)
        else:
            self.loader.load_state_dict(rank_state["data"])
            restore_rng(rank_state["rng"])
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.state.step)

    def _open_loggers(self) -> None:
        if not self.runtime.is_main:
            return
        self.metrics_file = JsonlWriter(self.run_dir / "metrics.jsonl")
        log_cfg = self.cfg.log
        self.wandb = WandbRun(log_cfg.wandb, self.run_dir, log_cfg.wandb_project,
                              log_cfg.wandb_name or self.run_dir.name, to_dict(self.cfg), self.state.wandb_run_id)
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
        with self._stop_signals():
            while self.state.step < cfg.train.steps:
                record = self._train_step(batches, meter, window)
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
        where = (f"step {self.state.step}, rank {self.runtime.rank}: loss={float(loss)}, "
                 f"grad_norm={float(grad_norm)}, samples {keys[:8]}")
        if self.cfg.train.on_nonfinite == "skip" and self.state.nonfinite_skips < self.cfg.train.max_nonfinite_skips:
            self.state.nonfinite_skips += 1
            log.warning("non-finite update skipped (%d of at most %d) at %s", self.state.nonfinite_skips,
                        self.cfg.train.max_nonfinite_skips, where)
            return
        raise NonFiniteError(f"non-finite loss or gradient norm at {where}"
                             if not finite else f"non-finite values on another rank at step {self.state.step}")

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
    @contextlib.contextmanager
    def _stop_signals(self):
        def request_stop(signum, frame):  # noqa: ARG001
            log.warning("received signal %d: saving at the next step boundary", signum)
            self.stop_requested = True

        previous = {}
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def save(self) -> Path:
        if not self._parameters_finite():
            raise NonFiniteError(f"refusing to checkpoint non-finite parameters at step {self.state.step}")
        rank_state = {"rng": capture_rng(), "data": self.loader.state_dict()}
        trainer_state = {**asdict(self.state), "world_size": self.runtime.world_size,
                         "backend": self.cfg.train.backend, "time": time.time()}
        path = self.checkpoints.save(self.state.step, self.backend, self.ema, trainer_state, rank_state)
        log.info("saved checkpoint %s", path)
        return path

    def _parameters_finite(self) -> bool:
        return not self.runtime.any_true(not self.backend.local_parameters_finite())

    def _close_loggers(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _configure_logging(run_dir: Path, is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger("scd_train")
    root.setLevel(level)
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if is_main:
        path = str(run_dir / "train.log")
        if not any(getattr(h, "baseFilename", None) == str(Path(path).resolve()) for h in root.handlers):
            root.addHandler(logging.FileHandler(path))
