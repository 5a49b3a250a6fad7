"""Streaming generation: one encoder call per frame, T Euler decoder steps, optional guidance.

``SCDStream`` and ``CausalDiTStream`` are interactive: ``prefill`` the context, then call
``next_frame(action)`` as actions arrive. ``generate`` runs a whole rollout and times it.
A model with ``model.encoder_window`` streams for ever at constant memory (its KV cache is a
ring, chosen by the model; nothing here depends on which); a full-history model stops at
``model.max_frames`` with an error naming both numbers. ``settings.steps`` is read at every
frame, and ``stream.last_timing`` holds the last frame's encoder and decoder seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scd_train.diffusion.decoder_loop import DecoderLoop, guided_velocity
from scd_train.errors import InputError
from scd_train.models.block import StepsConditioning
from scd_train.models.causal_dit import CausalDiT
from scd_train.models.layers import CLEAN_TIMESTEP
from scd_train.models.scd import SCDModel

MIN_GUIDANCE_CONTEXT_NOISE = 0.05


class StreamLengthError(InputError):
    """A full-history stream was asked for more frames than ``model.max_frames``."""


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SamplerSettings:
    # Euler steps per frame; a stream reads it at every frame, so it may change between frames.
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_mode: str = "decoder"
    num_train_timesteps: int = 1000
    schedule: str = "release"  # diffusion.sample_schedule
    # SCD's decoder loop: "off" (eager), "on" (torch.compile; on CUDA also a CUDA graph of each
    # frame's steps where it pays) or "auto" (on for CUDA, off elsewhere). See decoder_loop.py.
    compile: str = "off"

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def sigmas(self, device=None) -> Tensor:
        return sample_sigmas(self.steps, self.schedule, self.num_train_timesteps, device)


def settings_from_config(diffusion, steps: int | None = None, cfg_scale: float | None = None,
                         cfg_mode: str | None = None, compile: str | None = None) -> SamplerSettings:
    """A run's sampling defaults (``DiffusionConfig``), each overridable; every consumer builds its
    settings here, so a distilled student's step count and schedule reach all of them."""
    return SamplerSettings(steps=steps or diffusion.sample_steps,
                           cfg_scale=diffusion.cfg_scale if cfg_scale is None else cfg_scale,
                           cfg_mode=cfg_mode or diffusion.cfg_mode,
                           num_train_timesteps=diffusion.num_train_timesteps,
                           schedule=diffusion.sample_schedule,
                           compile=compile or diffusion.sample_compile)


@dataclass
class FrameTiming:
    """Wall seconds of the last generated frame: the context pass (SCD: the encoder call; the
    dense baseline: appending the previous frame to its cache) and the denoising steps."""

    encoder: float = 0.0
    decoder: float = 0.0


@dataclass
class CallCounts:
    """Model calls in a rollout: context passes (SCD: encoder; baseline: cache appends) and
    denoising passes (SCD: decoder; baseline: the whole stack)."""

    context: int = 0
    denoise: int = 0


def _null_actions(actions: Tensor | None, null_id: int) -> Tensor | None:
    return None if actions is None else torch.full_like(actions, null_id)


def max_stream_frames(model) -> int | None:
    """Frames a stream of ``model`` may hold in all (context + generated); None: no limit. The
    model's cache policy decides (a windowed one has none); the stream only asks."""
    return model.stream_frame_limit


def check_rollout_length(model, context_frames: int, generated_frames: int) -> None:
    """Refuse a full-history rollout longer than ``model.max_frames``, naming both numbers."""
    limit = max_stream_frames(model)
    total = context_frames + generated_frames
    if limit is not None and total > limit:
        raise StreamLengthError(
            f"a rollout of {total} frames ({context_frames} context + {generated_frames} generated) exceeds "
            f"model.max_frames={limit}; this model attends to its full history (model.encoder_window is null), "
            "so it cannot stream past max_frames: shorten the rollout, or use a model trained with "
            "model.encoder_window set")


def _schedule(settings: SamplerSettings, device: torch.device) -> tuple[Tensor, Tensor]:
    """(timesteps (T,), step sizes (T,)) of the Euler schedule: sigma_{i+1} - sigma_i."""
    sigmas = settings.sigmas(device)
    return sigmas[:-1] * settings.num_train_timesteps, sigmas[1:] - sigmas[:-1]


class SCDStream:
    """Stateful SCD rollout. Frames wait for the next action before the encoder reads them,
    because the encoder's frame i is conditioned on action i+1.

    With ``model.encoder_window`` set the encoder's cache is a fixed ring and the stream runs for
    ever at constant memory; without it the stream holds at most ``capacity_frames + 1`` frames
    (the last one is never encoded), and ``capacity_frames`` may not exceed ``model.max_frames``.
    """

    def __init__(self, model: SCDModel, settings: SamplerSettings, batch: int, capacity_frames: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if settings.guided and settings.cfg_mode == "action" and model.cfg.num_actions == 0:
            raise InputError("cfg_mode='action' needs an action-conditioned model (model.num_actions > 0)")
        self.model = model
        self.settings = settings
        self.generator = generator
        self.batch = batch
        self.action_guided = settings.guided and settings.cfg_mode == "action"
        self.device = next(model.parameters()).device
        cache_batch = 2 * batch if self.action_guided else batch
        limit = max_stream_frames(model)
        if limit is not None:
            # by default the stream holds max_frames frames in all; the last one is never encoded
            capacity_frames = limit - 1 if capacity_frames is None else capacity_frames
            if capacity_frames > limit:
                raise StreamLengthError(f"a stream encoding {capacity_frames} frames exceeds model.max_frames={limit}"
                                        "; this model has no model.encoder_window to stream past it")
        self.capacity_frames = capacity_frames if limit is not None else None  # a window has no limit
        self.cache = model.encoder.new_kv_cache(cache_batch, capacity_frames, None, self.device)
        self.pending: list[tuple[Tensor, Tensor | None]] = []  # frames not yet encoded, with their actions
        self.frames_encoded = 0
        self.counts = CallCounts()
        self.last_timing = FrameTiming()
        self._loop: DecoderLoop | None = None

    def prefill(self, frames: Tensor, actions: Tensor | None = None) -> None:
        """Queue context frames (B, F, C, H, W); ``actions`` (B, F) are the actions that led to them."""
        for i in range(frames.shape[1]):
            self.pending.append((frames[:, i], None if actions is None else actions[:, i]))

    @property
    def frames_held(self) -> int:
        """Frames in the stream so far: context and generated."""
        return self.frames_encoded + len(self.pending)

    @torch.no_grad()
    def next_frame(self, action: Tensor | None = None) -> Tensor:
        """Generate the next frame (B, C, H, W) under ``action`` (B,), and queue it as context."""
        self._check_room()
        start = time.perf_counter()
        context_cond, context_uncond = self._encode_pending(action)
        synchronize(self.device)
        encoded = time.perf_counter()
        frame = self._denoise(context_cond, context_uncond, action)
        synchronize(self.device)
        self.last_timing = FrameTiming(encoded - start, time.perf_counter() - encoded)
        self.pending.append((frame, action))
        return frame

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the decoder loop for the current settings now (nothing if it runs eagerly), so
        no timed frame pays for it. The stream's state and generator are untouched."""
        loop = self._decoder_loop()
        if loop.mode == "eager":
            return
        m = self.model.cfg
        x = torch.zeros((self.batch, m.latent_channels, m.latent_height, m.latent_width), device=self.device)
        branches = 2 if self.settings.guided else 1
        context = torch.zeros((branches * self.batch, self.model.encoder.tokens_per_frame, m.width),
                              device=self.device)
        action = None
        if m.num_actions > 0:
            action = torch.full((self.batch,), self.model.decoder.action_embed.null_id, device=self.device)
        timesteps, dts = _schedule(self.settings, self.device)
        conditioning = self._step_conditioning(timesteps, action)
        loop.warm_up(x, dts, context, conditioning, self.settings.cfg_scale if self.settings.guided else None)

    def _check_room(self) -> None:
        if self.capacity_frames is not None and self.frames_held > self.capacity_frames:
            raise StreamLengthError(
                f"the stream already holds {self.frames_held} frames; its full-history KV cache holds "
                f"{self.capacity_frames} encoded frames (model.max_frames={self.model.cfg.max_frames}); "
                "set model.encoder_window (a model trained with a window) to stream past it")

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

    def _decoder_loop(self) -> DecoderLoop:
        if self._loop is None or self._loop_setting != self.settings.compile:
            self._loop = DecoderLoop(self.model.decoder, self.settings.compile, self.device)
            self._loop_setting = self.settings.compile
        return self._loop

    def _step_conditioning(self, timesteps: Tensor, action: Tensor | None) -> StepsConditioning:
        """Every step's decoder conditioning for this frame, both guidance branches batched."""
        decoder = self.model.decoder
        if action is None and self.model.cfg.num_actions > 0:
            action = torch.full((self.batch,), decoder.action_embed.null_id, device=self.device, dtype=torch.long)
        branches = 2 if self.settings.guided else 1
        if action is not None and self.settings.guided:
            uncond = _null_actions(action, decoder.action_embed.null_id) if self.action_guided else action
            action = torch.cat([action, uncond])
        steps = timesteps[:, None].expand(-1, branches * self.batch)
        return decoder.step_conditioning(steps, action)

    def _denoise(self, context: Tensor, context_uncond: Tensor | None, action: Tensor | None) -> Tensor:
        cfg = self.model.cfg
        shape = (self.batch, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        x = torch.randn(shape, device=self.device, generator=self.generator)
        timesteps, dts = _schedule(self.settings, self.device)
        conditioning = self._step_conditioning(timesteps, action)
        guided = self.settings.guided
        if guided:
            context = torch.cat([context, context_uncond])
        self.counts.denoise += self.settings.steps
        return self._decoder_loop().run(x, dts, context, conditioning, self.settings.cfg_scale if guided else None)


class CausalDiTStream:
    """Stateful rollout of the dense baseline: all layers run at every step over the cached context.

    A generated frame is appended to the cache (one pass at the clean timestep) when the next frame
    is asked for, so a rollout never pays for a frame no one reads. ``capacity_frames`` bounds the
    committed frames of a full-history model; with ``model.encoder_window`` the cache is a fixed
    ring and the stream runs for ever.
    """

    def __init__(self, model: CausalDiT, settings: SamplerSettings, batch: int, capacity_frames: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if settings.guided and settings.cfg_mode != "action":
            raise InputError("the dense baseline has no encoder context to perturb: use cfg_mode='action'")
        if settings.guided and model.cfg.num_actions == 0:
            raise InputError("cfg_mode='action' needs an action-conditioned model (model.num_actions > 0)")
        self.model = model
        self.settings = settings
        self.generator = generator
        self.batch = batch
        self.device = next(model.parameters()).device
        cache_batch = 2 * batch if settings.guided else batch
        limit = max_stream_frames(model)
        if limit is not None:
            capacity_frames = limit - 1 if capacity_frames is None else capacity_frames
            if capacity_frames + 1 > limit:
                raise StreamLengthError(f"a stream committing {capacity_frames} frames (and denoising one more) "
                                        f"exceeds model.max_frames={limit}; this model has no model.encoder_window "
                                        "to stream past it")
        self.capacity_frames = capacity_frames if limit is not None else None  # a window has no limit
        # a full-history cache keeps one slot beyond the committed frames for the frame being denoised
        slots = None if self.capacity_frames is None else self.capacity_frames + 1
        self.cache = model.new_kv_cache(cache_batch, slots, None, self.device)
        self.frames_cached = 0
        self.pending: tuple[Tensor, Tensor | None] | None = None  # the last generated frame, not yet cached
        self.counts = CallCounts()
        self.last_timing = FrameTiming()

    def warm_up(self) -> None:
        """Nothing to prepare: the dense baseline's steps run eagerly (the same API as SCDStream)."""

    @torch.no_grad()
    def prefill(self, frames: Tensor, actions: Tensor | None = None) -> None:
        self._commit_pending()
        self._commit(frames.to(self.device), actions)

    @torch.no_grad()
    def next_frame(self, action: Tensor | None = None) -> Tensor:
        start = time.perf_counter()
        self._commit_pending()
        synchronize(self.device)
        committed = time.perf_counter()
        cfg = self.model.cfg
        x = torch.randn((self.batch, cfg.latent_channels, cfg.latent_height, cfg.latent_width),
                        device=self.device, generator=self.generator)
        actions = None if action is None else action[:, None]
        timesteps, dts = _schedule(self.settings, self.device)
        branches = 2 if self.settings.guided else 1
        both = actions
        if actions is not None and self.settings.guided:
            both = torch.cat([actions, _null_actions(actions, self.model.action_embed.null_id)])
        conditioning = self.model.step_conditioning(timesteps[:, None, None].expand(-1, branches * self.batch, 1),
                                                    both)
        for dt, cond in zip(dts.unbind(0), conditioning.steps()):
            v = self._velocity(x[:, None], cond)[:, 0]
            x = x + dt * v.float()
        synchronize(self.device)
        self.last_timing = FrameTiming(committed - start, time.perf_counter() - committed)
        self.pending = (x, actions)
        return x

    def _velocity(self, x: Tensor, conditioning) -> Tensor:
        self.counts.denoise += 1
        if self.settings.guided:
            x = torch.cat([x, x])
        v = self.model(x, None, None, self.cache, self.frames_cached, commit=False, conditioning=conditioning)
        if not self.settings.guided:
            return v
        v_cond, v_uncond = v.chunk(2)
        return guided_velocity(v_cond.float(), v_uncond.float(), self.settings.cfg_scale)

    def _commit_pending(self) -> None:
        if self.pending is None:
            return
        if self.capacity_frames is not None and self.frames_cached >= self.capacity_frames:
            raise StreamLengthError(
                f"the stream already holds {self.frames_cached + 1} frames; its full-history KV cache commits at "
                f"most {self.capacity_frames} (model.max_frames={self.model.cfg.max_frames}); set "
                "model.encoder_window (a model trained with a window) to stream past it")
        frame, actions = self.pending
        self.pending = None
        self._commit(frame[:, None], actions)

    def _commit(self, frames: Tensor, actions: Tensor | None) -> None:
        """Append clean frames to the cache (one pass at the clean timestep)."""
        batch, count = frames.shape[:2]
        if self.capacity_frames is not None and self.frames_cached + count > self.capacity_frames:
            raise StreamLengthError(f"{self.frames_cached + count} context frames exceed the stream's "
                                    f"{self.capacity_frames} (model.max_frames={self.model.cfg.max_frames})")
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
    # the first frame with the prefill included: the dense baseline does its context pass in
    # ``prefill``, SCD in its first ``next_frame``, so only the sum compares like with like
    first_frame_seconds: float
    frame_seconds: list[float] = field(default_factory=list)  # every generated frame, first included
    counts: CallCounts = field(default_factory=CallCounts)
    prefill_seconds: float = 0.0  # the ``prefill`` call alone

    @property
    def steady_frame_seconds(self) -> float:
        """Median seconds per frame after the first (which includes the context prefill)."""
        rest = sorted(self.frame_seconds[1:]) or [self.first_frame_seconds]
        return rest[len(rest) // 2]


def new_stream(model, settings: SamplerSettings, batch: int, capacity_frames: int | None = None,
               generator: torch.Generator | None = None):
    """The stream of ``model``'s kind. ``capacity_frames`` bounds a full-history stream's cache
    (default: what ``model.max_frames`` allows); a windowed model streams for ever and ignores it."""
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
    check_rollout_length(model, num_context, unroll)
    stream = new_stream(model, settings, batch, num_context + unroll - 1, generator)
    stream.warm_up()  # compilation, if any, stays out of the timed frames
    start = time.perf_counter()
    stream.prefill(context, None if actions is None else actions[:, :num_context])
    synchronize(stream.device)
    prefill_seconds = time.perf_counter() - start
    frames, seconds = [], []
    for i in range(unroll):
        action = None if actions is None else actions[:, num_context + i].to(stream.device)
        start = time.perf_counter()
        frames.append(stream.next_frame(action))
        synchronize(stream.device)
        seconds.append(time.perf_counter() - start)
    out = torch.cat([context.to(stream.device).float(), torch.stack(frames, dim=1)], dim=1)
    first = prefill_seconds + (seconds[0] if seconds else 0.0)
    return Rollout(out, first, seconds, stream.counts, prefill_seconds)
