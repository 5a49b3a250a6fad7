"""One training step of a built model, as the trainer composes it, for the training and FP8 sections.

Every variant of a comparison sees the same clips in the same order and the same noise draws: the
RNG is seeded with the step's index before the objective runs, so step i of two variants differs
only in what the comparison changes (checkpointing, FP8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpu_sections.common import SectionContext, SkipForTime, peak_memory_gb, randomize, reset_peak_memory

CLIP_POOL = 4  # distinct clips cycled through; steps repeat data, never its order


def clip_pool(cfg, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    m = cfg.model
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (cfg.data.batch_size, cfg.data.clip_frames, m.latent_channels, m.latent_height, m.latent_width)
    pool = []
    for _ in range(CLIP_POOL):
        latents = torch.randn(shape, generator=generator).to(device)
        actions = (torch.randint(0, m.num_actions, shape[:2], generator=generator).to(device)
                   if m.num_actions > 0 else None)
        pool.append((latents, actions))
    return pool


@dataclass
class TrainStep:
    cfg: object
    device: torch.device
    backend: object
    objective: object
    fp8: object
    clips: list
    losses: list[float] = field(default_factory=list)
    peak_gb: float | None = None
    last_seconds: float = 0.0
    steps_done: int = 0

    @classmethod
    def build(cls, cfg, device: torch.device, seed: int = 0, perturb: bool = False) -> TrainStep:
        """The model, FP8 conversion (when ``cfg.precision.fp8`` asks) and backend, in the trainer's order.

        ``perturb`` adds the same noise to every weight first: a fresh model's zero-initialised gates
        make its blocks contribute nothing, so a precision change inside them could not move the loss.
        """
        from scd_train.diffusion.objective import build_objective
        from scd_train.models import build_model
        from scd_train.optim import build_param_groups
        from scd_train.parallel.backend import build_backend
        from scd_train.parallel.runtime import Runtime
        from scd_train.precision import prepare_fp8

        if device.type == "cuda":
            torch.cuda.set_device(device)
        runtime = Runtime(0, 1, 0, device)
        torch.manual_seed(seed)  # the same initial weights for every variant
        model = build_model(cfg.model)
        if perturb:
            randomize(model, seed + 1)
        fp8 = prepare_fp8(model, cfg, runtime)
        backend = build_backend(model, build_param_groups(model, cfg.optim), cfg, runtime)
        return cls(cfg, device, backend, build_objective(cfg.model, cfg.diffusion), fp8, clip_pool(cfg, device))

    def step(self) -> torch.Tensor:
        from scd_train.optim import set_learning_rates

        index = self.steps_done
        set_learning_rates(self.backend.optimizer, index, self.cfg.optim)
        latents, actions = self.clips[index % len(self.clips)]
        torch.manual_seed(1000 + index)
        with self.backend.autocast(), self.fp8.autocast():
            out = self.objective(self.backend.module, latents, actions)
        self.backend.backward(out.loss)
        self.backend.clip_grad_norm(self.cfg.optim.grad_clip)
        self.backend.step()
        self.steps_done += 1
        return out.loss.detach()

    def measured_step(self) -> None:
        """One step, its loss and the peak memory it reached (the timer wraps this call)."""
        reset_peak_memory(self.device)
        loss = self.step()
        peak = peak_memory_gb(self.device)
        if peak is not None:
            self.peak_gb = max(peak, self.peak_gb or 0.0)
        self.losses.append(float(loss))

    def first_step_seconds(self) -> float:
        """Run one untimed-by-the-comparison step (kernel compilation, allocator warm-up) and time it."""
        from scd_train.metrics.timing import time_call

        self.last_seconds, _ = time_call(self.measured_step, self.device)
        return self.last_seconds

    def reset_records(self) -> None:
        self.losses, self.peak_gb = [], None


def fit_repeats(ctx: SectionContext, seconds_per_call: list[float], target: int, share: float = 0.7) -> int:
    """How many interleaved rounds fit in ``share`` of the section's remaining time (at most ``target``)."""
    round_s = max(sum(seconds_per_call), 1e-6)
    fits = int(share * ctx.time_left() / round_s)
    if fits < 1:
        raise SkipForTime(f"{ctx.name}: one round takes about {round_s:.1f} s, {ctx.time_left():.0f} s left")
    return min(target, fits)


def timed_warm_up(variants: dict, rounds: int = 2) -> dict[str, list[float]]:
    """``rounds`` warm-up steps per variant, in turn; the last one is the estimate for ``fit_repeats``."""
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            seconds[name].append(v.first_step_seconds())
    for v in variants.values():
        v.reset_records()
    return seconds
