"""Streaming speed of SCD against the dense causal baseline at matched width and total depth.

What makes the ratio hold still on a busy machine:

- the two models are timed side by side, one frame of each at a time, in an order that flips every
  repeat (``scd_train.metrics.timing.interleaved``), so a change of machine load lands on both;
- every figure is a median and a minimum over many frames, and process CPU time sits beside wall
  time (a frame that waited for the CPU shows a wall time well above its CPU time);
- both prefills, the pass over the context frames before the first generated frame, are timed the
  same way, on their own: the dense model's runs in ``prefill`` and SCD's inside its first
  ``next_frame`` (its encoder reads frame i with action i+1, so it waits for the first action),
  so the prefill is measured through the same model calls both streams make, and the first frame
  is timed with the prefill included for both;
- CPU runs pin the thread count (``pinned_threads``) and record it with the machine load;
- the analytic FLOP ratio is reported beside every speed ratio.

Both models condition on the same clean context latents (timestep -1) and the same actions, and
their generated frames join the context as clean frames: the history kind is the same for both.
Weights are random: speed does not depend on what they learned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable, Iterator

import torch

from scd_train.config import Config
from scd_train.diffusion.objective import next_frame_actions
from scd_train.diffusion.sampling import SamplerSettings, new_stream
from scd_train.metrics.flops import causal_dit_forward, encoder_forward, generated_frame_flops
from scd_train.metrics.timing import MachineLoad, TimingStats, interleaved
from scd_train.models.attention import KVCache
from scd_train.models.layers import CLEAN_TIMESTEP

HISTORY = ("both models condition on the same clean context latents (timestep -1) and actions; generated "
           "frames join the context as clean frames")
MODELS = ("scd", "causal_dit")


@dataclasses.dataclass
class SpeedSettings:
    context: int = 16
    # Each rollout starts from the context: one prefill, one first frame, then unroll - 1 steady frames.
    rollouts: int = 4
    unroll: int = 8
    steps: int = 20
    guided: bool = False
    batch: int = 1

    @property
    def steady_frames(self) -> int:
        return self.rollouts * (self.unroll - 1)


def paired_configs(cfg: Config) -> tuple[Config, Config]:
    """(SCD, dense baseline) of the same width; the baseline's depth is encoder + decoder layers."""
    scd = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="scd"))
    depth = cfg.model.encoder_layers + cfg.model.decoder_layers
    dense = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="causal_dit", layers=depth))
    return scd, dense


@contextlib.contextmanager
def pinned_threads(threads: int | None, device: torch.device) -> Iterator[int]:
    """Run CPU timing at a fixed intra-op thread count (restored afterwards); yields the count."""
    before = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def sampler_settings(arch: str, settings: SpeedSettings) -> SamplerSettings:
    """SCD guides with its decoder-context noise, the dense model with null actions (its only kind)."""
    return SamplerSettings(steps=settings.steps, cfg_scale=2.0 if settings.guided else 1.0,
                           cfg_mode="decoder" if arch == "scd" else "action")


class TimedModel:
    """One model's side of the comparison: fresh streams, prefill passes and frames as callables."""

    def __init__(self, model: torch.nn.Module, cfg: Config, settings: SpeedSettings, context: torch.Tensor,
                 actions: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.model, self.cfg, self.settings = model, cfg, settings
        self.context, self.actions, self.dtype = context, actions, dtype
        self.device = context.device
        self.arch = cfg.model.arch
        self.sampler = sampler_settings(self.arch, settings)
        self.stream = None
        self.frames_made = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _action(self, index: int) -> torch.Tensor | None:
        return None if self.actions is None else self.actions[:, index]

    @torch.no_grad()
    def prefill_pass(self) -> KVCache:
        """The context pass alone, through the calls the stream makes before its first frame: SCD's
        encoder over the context (frame i with action i+1), or the dense model's cache append."""
        c = self.settings.context
        guided_batch = self.sampler.guided and (self.arch == "causal_dit" or self.sampler.cfg_mode == "action")
        latents, actions = self.context, None if self.actions is None else self.actions[:, :c + 1]
        if guided_batch:  # null-action guidance runs the context twice, the second copy with null actions
            latents = torch.cat([latents, latents])
            if actions is not None:
                actions = torch.cat([actions, torch.full_like(actions, self.cfg.model.num_actions)])
        rows = latents.shape[0]
        with self.autocast():
            if self.arch == "scd":
                cache = self.model.encoder.new_kv_cache(rows, c, next(self.model.parameters()).dtype, self.device)
                enc_actions = None if actions is None else next_frame_actions(actions)[:, :c]
                self.model.encoder.forward_hidden(latents, enc_actions, cache, 0)
                return cache
            cache = self.model.new_kv_cache(rows, c + 1, next(self.model.parameters()).dtype, self.device)
            t = torch.full((rows, c), CLEAN_TIMESTEP, device=self.device)
            self.model(latents, t, None if actions is None else actions[:, :c], cache, 0, commit=True)
            return cache

    @torch.no_grad()
    def first_frame(self) -> None:
        """A fresh stream: prefill and the first generated frame, timed together for both models."""
        s = self.settings
        self.stream = new_stream(self.model, self.sampler, s.batch, s.context + s.unroll, None)
        with self.autocast():
            self.stream.prefill(self.context, None if self.actions is None else self.actions[:, :s.context])
            self.stream.next_frame(self._action(s.context))
        self.frames_made = 1

    @torch.no_grad()
    def next_frame(self) -> None:
        with self.autocast():
            self.stream.next_frame(self._action(self.settings.context + self.frames_made))
        self.frames_made += 1

    def calls_per_frame(self) -> dict:
        """Model calls per generated frame of the last rollout. Both streams make one context pass per
        frame: SCD's first one covers the prefill too, the dense model's prefill is a call of its own,
        and both defer the context pass of the newest frame to the frame after it (the dense stream
        appends frame k to its cache when frame k + 1 is asked for)."""
        counts = self.stream.counts
        return {"context": counts.context / self.frames_made, "denoise": counts.denoise / self.frames_made}


def _merge(into: dict[str, TimingStats], more: dict[str, TimingStats]) -> None:
    for name, stats in more.items():
        into[name].wall.extend(stats.wall)
        into[name].cpu.extend(stats.cpu)


def _in_order(candidates: dict[str, Callable[[], object]], flip: bool) -> dict[str, Callable[[], object]]:
    names = list(candidates)[::-1] if flip else list(candidates)
    return {name: candidates[name] for name in names}


def _flops(cfg: Config, settings: SpeedSettings) -> dict:
    """Analytic GFLOPs of the prefill, of the first frame (prefill included) and of a steady frame
    (the mean over the contexts the steady frames are generated at), for batch ``settings.batch``."""
    m, c, b = cfg.model, settings.context, settings.batch
    # decoder-context guidance runs SCD's encoder once, at batch B; null actions double the dense pass
    dense_branches = 2 if settings.guided else 1
    prefill = encoder_forward(m, c) if m.arch == "scd" else dense_branches * causal_dit_forward(m, c)
    first = generated_frame_flops(m, c, settings.steps, settings.guided)
    # SCD's prefill already encodes the last context frame; the dense model appends its new frame after
    first_frame = prefill + first.decoder + (first.encoder if m.arch == "causal_dit" else 0.0)
    steady = [generated_frame_flops(m, c + i, settings.steps, settings.guided) for i in range(1, settings.unroll)]
    per_frame = {"context": statistics.fmean(f.encoder for f in steady) * b / 1e9,
                 "denoise": statistics.fmean(f.decoder for f in steady) * b / 1e9}
    per_frame["total"] = per_frame["context"] + per_frame["denoise"]
    return {"prefill": prefill * b / 1e9, "first_frame": first_frame * b / 1e9, "frame": per_frame}


def compare_speed(scd_model, dense_model, scd_cfg: Config, dense_cfg: Config, settings: SpeedSettings,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Prefill, first-frame and steady per-frame timing of both models, interleaved, with ratios."""
    device = next(scd_model.parameters()).device
    m = scd_cfg.model
    generator = torch.Generator(device=device).manual_seed(0)
    context = torch.randn((settings.batch, settings.context, m.latent_channels, m.latent_height, m.latent_width),
                          device=device, generator=generator)
    total = settings.context + settings.unroll
    actions = (torch.randint(0, m.num_actions, (settings.batch, total), device=device, generator=generator)
               if m.num_actions else None)
    timed = {"scd": TimedModel(scd_model, scd_cfg, settings, context, actions, dtype),
             "causal_dit": TimedModel(dense_model, dense_cfg, settings, context, actions, dtype)}
    phases = {phase: {name: TimingStats() for name in MODELS} for phase in ("prefill", "first_frame", "frame")}
    # warm-up: allocator, kernel choice and lazy initialisation, on both models, untimed
    for t in timed.values():
        t.prefill_pass()
        t.first_frame()
        t.next_frame()
    for r in range(settings.rollouts):
        flip = r % 2 == 1
        _merge(phases["prefill"], interleaved(_in_order({n: t.prefill_pass for n, t in timed.items()}, flip), 1, 0,
                                              device))
        _merge(phases["first_frame"], interleaved(_in_order({n: t.first_frame for n, t in timed.items()}, flip), 1,
                                                  0, device))
        _merge(phases["frame"], interleaved(_in_order({n: t.next_frame for n, t in timed.items()}, flip),
                                            settings.unroll - 1, 0, device))
    row: dict = {"context_frames": settings.context}
    flops = {"scd": _flops(scd_cfg, settings), "causal_dit": _flops(dense_cfg, settings)}
    for name in MODELS:
        row[name] = {phase: phases[phase][name].summary() for phase in phases}
        row[name]["frames_per_s"] = settings.batch / phases["frame"][name].median
        row[name]["calls_per_frame"] = timed[name].calls_per_frame()
        row[name]["gflops"] = flops[name]
    row["ratios"] = {phase: speed_ratios(phases[phase]["causal_dit"], phases[phase]["scd"],
                                         _flops_of(flops, phase))
                     for phase in phases}
    return row


def _flops_of(flops: dict, phase: str) -> float:
    def value(name: str) -> float:
        v = flops[name][phase]
        return v["total"] if isinstance(v, dict) else v

    return value("causal_dit") / value("scd")


def speed_ratios(dense: TimingStats, scd: TimingStats, flops_ratio: float) -> dict:
    """How many times faster SCD is, by wall median, wall minimum and CPU median, beside the FLOP ratio."""
    return {"wall_median": dense.median / scd.median, "wall_min": dense.minimum / scd.minimum,
            "cpu_median": dense.cpu_median / scd.cpu_median, "flops": flops_ratio}


def measure(cfg: Config, settings_list: list[SpeedSettings], device: torch.device, dtype: torch.dtype,
            threads: int | None = None, on_row: Callable[[dict], None] | None = None) -> dict:
    """Build both models with fresh weights and compare them at every setting (``on_row`` sees each
    result as it is measured); records the threads and the machine load before and after."""
    from scd_train.models import build_model

    scd_cfg, dense_cfg = paired_configs(cfg)
    torch.manual_seed(0)
    scd = build_model(scd_cfg.model).to(device).eval()
    dense = build_model(dense_cfg.model).to(device).eval()
    with pinned_threads(threads, device) as used:
        load_before = MachineLoad.now().to_dict()
        rows = []
        for settings in settings_list:
            rows.append(compare_speed(scd, dense, scd_cfg, dense_cfg, settings, dtype))
            if on_row is not None:
                on_row(rows[-1])
        load_after = MachineLoad.now().to_dict()
    return {"threads": used if device.type == "cpu" else None, "history": HISTORY,
            "machine_load": {"before": load_before, "after": load_after}, "results": rows}
