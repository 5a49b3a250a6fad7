"""Streaming generation: one encoder call per frame, T Euler decoder steps, optional guidance.

``SCDStream`` and ``CausalDiTStream`` are interactive: ``prefill`` the context, then call
``next_frame(action)`` as actions arrive. ``generate`` runs a whole rollout and times it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scd_train.models.causal_dit import CausalDiT
from scd_train.models.layers import CLEAN_TIMESTEP
from scd_train.models.scd import SCDModel

MIN_GUIDANCE_CONTEXT_NOISE = 0.05


def euler_sigmas(steps: int, num_train_timesteps: int = 1000, device=None) -> Tensor:
    """steps+1 noise levels: linear from 1 down to 1/T, then 0."""
    sigmas = torch.linspace(1.0, 1.0 / num_train_timesteps, steps, device=device, dtype=torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_sigmas(steps: int, schedule: str = "release", num_train_timesteps: int = 1000, device=None) -> Tensor:
    """steps+1 noise levels of an Euler schedule (``diffusion.sample_schedule``): "release" as
    ``euler_sigmas``, "uniform" ``steps`` equal intervals from 1 to 0."""
    if schedule == "uniform":
        return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float32)
    if schedule == "release":
        return euler_sigmas(steps, num_train_timesteps, device)
    raise ValueError(f"sample schedule {schedule!r} is not one of 'release', 'uniform'")


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SamplerSettings:
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_mode: str = "decoder"
    num_train_timesteps: int = 1000
    schedule: str = "release"  # diffusion.sample_schedule

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def sigmas(self, device=None) -> Tensor:
        return sample_sigmas(self.steps, self.schedule, self.num_train_timesteps, device)


def settings_from_config(diffusion, steps: int | None = None, cfg_scale: float | None = None,
                         cfg_mode: str | None = None) -> SamplerSettings:
    """A run's sampling defaults (``DiffusionConfig``), each overridable; every consumer builds its
    settings here, so a distilled student's step count and schedule reach all of them."""
    return SamplerSettings(steps=steps or diffusion.sample_steps,
                           cfg_scale=diffusion.cfg_scale if cfg_scale is None else cfg_scale,
                           cfg_mode=cfg_mode or diffusion.cfg_mode,
                           num_train_timesteps=diffusion.num_train_timesteps,
                           schedule=diffusion.sample_schedule)


@dataclass
class CallCounts:
    """Model calls in a rollout: context passes (SCD: encoder; baseline: cache appends) and
    denoising passes (SCD: decoder; baseline: the whole stack)."""

    context: int = 0
    denoise: int = 0


def _null_actions(actions: Tensor | None, null_id: int) -> Tensor | None:
    return None if actions is None else torch.full_like(actions, null_id)


class SCDStream:
    """Stateful SCD rollout. Frames wait for the next action before the encoder reads them,
    because the encoder's frame i is conditioned on action i+1."""

    def __init__(self, model: SCDModel, settings: SamplerSettings, batch: int, capacity_frames: int,
                 generator: torch.Generator | None = None) -> None:
        if settings.guided and settings.cfg_mode == "action" and model.cfg.num_actions == 0:
            raise ValueError("cfg_mode='action' needs an action-conditioned model (model.num_actions > 0)")
        self.model = model
        self.settings = settings
        self.generator = generator
        self.batch = batch
        self.action_guided = settings.guided and settings.cfg_mode == "action"
        param = next(model.parameters())
        self.device = param.device
        cache_batch = 2 * batch if self.action_guided else batch
        self.cache = model.encoder.new_kv_cache(cache_batch, capacity_frames, param.dtype, self.device)
        self.pending: list[tuple[Tensor, Tensor | None]] = []  # frames not yet encoded, with their actions
        self.frames_encoded = 0
        self.counts = CallCounts()

    def prefill(self, frames: Tensor, actions: Tensor | None = None) -> None:
        """Queue context frames (B, F, C, H, W); ``actions`` (B, F) are the actions that led to them."""
        for i in range(frames.shape[1]):
            self.pending.append((frames[:, i], None if actions is None else actions[:, i]))

    @torch.no_grad()
    def next_frame(self, action: Tensor | None = None) -> Tensor:
        """Generate the next frame (B, C, H, W) under ``action`` (B,), and queue it as context."""
        context_cond, context_uncond = self._encode_pending(action)
        frame = self._denoise(context_cond, context_uncond, action)
        self.pending.append((frame, action))
        return frame

    def _encode_pending(self, action: Tensor | None) -> tuple[Tensor, Tensor | None]:
        latents = torch.stack([f for f, _ in self.pending], dim=1).to(self.device)
        enc_actions = self._encoder_actions(action)
        if self.action_guided:
            latents = torch.cat([latents, latents])
            null = _null_actions(enc_actions, self.model.encoder.action_embed.null_id)
            enc_actions = torch.cat([enc_actions, null])
        hidden, cond_act = self.model.encoder.forward_hidden(latents, enc_actions, self.cache, self.frames_encoded)
        self.counts.context += 1
        self.frames_encoded += latents.shape[1]
        self.pending.clear()
        n = self.model.encoder.tokens_per_frame
        last_hidden, last_cond = hidden[:, -n:], cond_act[:, -1:]
        context = self.model.encoder.output_head(last_hidden, last_cond)[:, 0]
        if self.action_guided:
            return context[: self.batch], context[self.batch:]
        if not self.settings.guided:
            return context, None
        std = max(self.model.cfg.context_noise, MIN_GUIDANCE_CONTEXT_NOISE)
        noise = torch.randn(last_hidden.shape, device=self.device, generator=self.generator) * std
        return context, self.model.encoder.output_head(last_hidden, last_cond, noise=noise)[:, 0]

    def _encoder_actions(self, action: Tensor | None) -> Tensor | None:
        if self.model.cfg.num_actions == 0:
            return None
        follow = [a for _, a in self.pending[1:]] + [action]
        if any(a is None for a in follow):
            null = self.model.encoder.action_embed.null_id
            follow = [torch.full((self.batch,), null, device=self.device, dtype=torch.long) if a is None else a
                      for a in follow]
        return torch.stack(follow, dim=1).to(self.device)

    def _denoise(self, context: Tensor, context_uncond: Tensor | None, action: Tensor | None) -> Tensor:
        cfg = self.model.cfg
        shape = (self.batch, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        x = torch.randn(shape, device=self.device, generator=self.generator)
        if action is None and cfg.num_actions > 0:
            action = torch.full((self.batch,), self.model.decoder.action_embed.null_id, device=self.device,
                                dtype=torch.long)
        sigmas = self.settings.sigmas(self.device)
        for i in range(self.settings.steps):
            t = sigmas[i].expand(self.batch) * self.settings.num_train_timesteps
            v = self._velocity(x, t, context, context_uncond, action)
            x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
        return x

    def _velocity(self, x: Tensor, t: Tensor, context: Tensor, context_uncond: Tensor | None,
                  action: Tensor | None) -> Tensor:
        decoder = self.model.decoder
        self.counts.denoise += 1
        if not self.settings.guided:
            return decoder(x, t, context, action)
        uncond_action = action
        if self.action_guided:
            uncond_action = _null_actions(action, decoder.action_embed.null_id)
        both_actions = None if action is None else torch.cat([action, uncond_action])
        v = decoder(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, context_uncond]), both_actions)
        v_cond, v_uncond = v.chunk(2)
        return guided_velocity(v_cond.float(), v_uncond.float(), self.settings.cfg_scale)


class CausalDiTStream:
    """Stateful rollout of the dense baseline: all layers run at every step over the cached context."""

    def __init__(self, model: CausalDiT, settings: SamplerSettings, batch: int, capacity_frames: int,
                 generator: torch.Generator | None = None) -> None:
        if settings.guided and settings.cfg_mode != "action":
            raise ValueError("the dense baseline has no encoder context to perturb: use cfg_mode='action'")
        if settings.guided and model.cfg.num_actions == 0:
            raise ValueError("cfg_mode='action' needs an action-conditioned model (model.num_actions > 0)")
        self.model = model
        self.settings = settings
        self.generator = generator
        self.batch = batch
        param = next(model.parameters())
        self.device = param.device
        cache_batch = 2 * batch if settings.guided else batch
        self.capacity_frames = capacity_frames
        # one slot beyond the committed frames holds the noisy frame during denoising
        self.cache = model.new_kv_cache(cache_batch, capacity_frames + 1, param.dtype, self.device)
        self.frames_cached = 0
        self.counts = CallCounts()

    @torch.no_grad()
    def prefill(self, frames: Tensor, actions: Tensor | None = None) -> None:
        self._commit(frames.to(self.device), actions)

    @torch.no_grad()
    def next_frame(self, action: Tensor | None = None) -> Tensor:
        cfg = self.model.cfg
        x = torch.randn((self.batch, cfg.latent_channels, cfg.latent_height, cfg.latent_width),
                        device=self.device, generator=self.generator)
        actions = None if action is None else action[:, None]
        sigmas = self.settings.sigmas(self.device)
        for i in range(self.settings.steps):
            t = sigmas[i].expand(self.batch, 1) * self.settings.num_train_timesteps
            v = self._velocity(x[:, None], t, actions)[:, 0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
        if self.frames_cached < self.capacity_frames:
            self._commit(x[:, None], actions)
        return x

    def _velocity(self, x: Tensor, t: Tensor, actions: Tensor | None) -> Tensor:
        self.counts.denoise += 1
        run = lambda lat, ts, act: self.model(lat, ts, act, self.cache, self.frames_cached, commit=False)  # noqa: E731
        if not self.settings.guided:
            return run(x, t, actions)
        both = torch.cat([actions, _null_actions(actions, self.model.action_embed.null_id)])
        v_cond, v_uncond = run(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return guided_velocity(v_cond.float(), v_uncond.float(), self.settings.cfg_scale)

    def _commit(self, frames: Tensor, actions: Tensor | None) -> None:
        """Append clean frames to the cache (one pass at the clean timestep)."""
        batch, count = frames.shape[:2]
        t = torch.full((batch, count), CLEAN_TIMESTEP, device=self.device)
        if self.settings.guided:
            frames, t = torch.cat([frames, frames]), torch.cat([t, t])
            actions = torch.cat([actions, _null_actions(actions, self.model.action_embed.null_id)])
        self.model(frames, t, actions, self.cache, self.frames_cached, commit=True)
        self.counts.context += 1
        self.frames_cached += count


@dataclass
class Rollout:
    frames: Tensor  # (B, context + unroll, C, H, W), context included
    first_frame_seconds: float
    frame_seconds: list[float] = field(default_factory=list)  # every generated frame, first included
    counts: CallCounts = field(default_factory=CallCounts)

    @property
    def steady_frame_seconds(self) -> float:
        """Median seconds per frame after the first (which includes the context prefill)."""
        rest = sorted(self.frame_seconds[1:]) or [self.first_frame_seconds]
        return rest[len(rest) // 2]


def new_stream(model, settings: SamplerSettings, batch: int, capacity_frames: int,
               generator: torch.Generator | None = None):
    kind = SCDStream if isinstance(model, SCDModel) else CausalDiTStream
    return kind(model, settings, batch, capacity_frames, generator)


@torch.no_grad()
def generate(model, context: Tensor, actions: Tensor | None, unroll: int, settings: SamplerSettings,
             generator: torch.Generator | None = None) -> Rollout:
    """Roll out ``unroll`` frames after ``context`` (B, c, C, H, W).

    ``actions`` (B, c + unroll) holds, for every frame, the action that led to it.
    """
    batch, num_context = context.shape[:2]
    if actions is not None and actions.shape[1] < num_context + unroll:
        raise ValueError(f"actions cover {actions.shape[1]} frames; context + unroll needs {num_context + unroll}")
    stream = new_stream(model, settings, batch, num_context + unroll - 1, generator)
    stream.prefill(context, None if actions is None else actions[:, :num_context])
    frames, seconds = [], []
    for i in range(unroll):
        action = None if actions is None else actions[:, num_context + i].to(stream.device)
        start = time.perf_counter()
        frames.append(stream.next_frame(action))
        synchronize(stream.device)
        seconds.append(time.perf_counter() - start)
    out = torch.cat([context.to(stream.device).float(), torch.stack(frames, dim=1)], dim=1)
    return Rollout(out, seconds[0] if seconds else 0.0, seconds, stream.counts)
