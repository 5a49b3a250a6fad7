"""Few-step distillation: a student sampled in K Euler steps learns where the teacher's ODE goes.

Method ``trajectory`` (``distill.method``): the student keeps the ordinary Euler sampler, run on
its own K-interval grid (``diffusion.sample_schedule``, "uniform" for students). For a student step
from noise level s_i down to s_(i+1), the frozen teacher integrates its probability-flow ODE over
the same interval with ceil(N / K) Euler sub-steps of its own (N = ``distill.teacher_steps``,
guidance as configured). The student's velocity at (x, s_i) regresses the mean velocity of that
path, (x_teacher(s_(i+1)) - x) / (s_(i+1) - s_i), so one student step lands where the teacher's
sub-steps land. This is rectified flow's k-step distillation (Liu et al., 2022) with the start
states of progressive distillation (Salimans & Ho, 2022): each step is trained from states of the
forward process, x = (1 - s_i) x0 + s_i eps, so one step costs N / K teacher calls, not N.

With ``distill.self_rollout`` the run trains on the student's own rollouts instead: the student
generates every frame after the first ``rollout_context_frames`` of a clip (its own K-step sampler,
no gradient), the encoder reads those frames as history, and each trained step starts from the
student's own state at s_i for that frame (its first i steps from fresh noise). The teacher is
queried exactly where the student goes, so errors do not compound over a stream (DAgger-style,
as Self-Forcing trains on self-rollouts). The objective never reads the ground truth of a
generated position: the teacher's ODE provides every target.

``DistillationPair`` is the one module the training backends wrap: the trainable student (its
parameters keep the student's own names, so a checkpoint loads as an ordinary model) beside the
frozen teacher (``teacher.*``). Both run in eval mode: action dropout or context noise in either
would make the regression targets disagree with what the student is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scd_train.config import Config
from scd_train.diffusion.decoder_loop import guided_velocity
from scd_train.diffusion.flow import add_noise, masked_clip_mean, per_frame_mse
from scd_train.diffusion.objective import LossOutput, next_frame_actions, target_frame_indices
from scd_train.diffusion.sampling import MIN_GUIDANCE_CONTEXT_NOISE, SamplerSettings, new_stream, sample_sigmas
from scd_train.metrics.flops import StepFlops, causal_dit_forward, decoder_forward, encoder_forward
from scd_train.models.layers import CLEAN_TIMESTEP


def teacher_substeps(teacher_steps: int, student_steps: int) -> int:
    """Teacher Euler steps inside one student step (at least ``teacher_steps`` over the path)."""
    return math.ceil(teacher_steps / student_steps)


class SCDTeacher(nn.Module):
    """The frozen part of an SCD teacher: its decoder, and its encoder when the student trains its
    own (otherwise the student's frozen encoder is the teacher's and is not stored twice)."""

    def __init__(self, decoder: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder


class DistillationPair(nn.Module):
    """Student and frozen teacher as one module; ``forward`` returns (prediction, target, mask)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, method: TrajectoryMethod) -> None:
        super().__init__()
        for name, child in student.named_children():
            self.add_module(name, child)
        # Not registered again: its children are this module's, under the student's own names.
        self.__dict__["student"] = student
        self.__dict__["method"] = method
        self.teacher = teacher.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> DistillationPair:  # noqa: ARG002 - always eval, see module doc
        return super().train(False)

    def forward(self, latents: Tensor, actions: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self.method.predict(self, latents, actions)


@dataclass
class Guidance:
    scale: float = 1.0
    mode: str = "decoder"  # "decoder": perturbed encoder context; "action": null actions
    context_noise: float = MIN_GUIDANCE_CONTEXT_NOISE

    @property
    def guided(self) -> bool:
        return self.scale != 1.0


class TrajectoryMethod:
    """What both architectures share: the student grid, segment draws and the teacher's sub-steps."""

    def __init__(self, cfg: Config) -> None:
        d, dist = cfg.diffusion, cfg.distill
        if dist.teacher_steps is None:
            raise ValueError("distill.teacher_steps must be resolved before the objective is built")
        self.steps = d.sample_steps
        self.schedule = d.sample_schedule
        self.substeps = teacher_substeps(dist.teacher_steps, d.sample_steps)
        self.num_train_timesteps = d.num_train_timesteps
        self.draws = d.decoder_multi_batch
        self.target_window = d.target_window
        self.self_rollout = dist.self_rollout
        self.first_target = dist.rollout_context_frames if dist.self_rollout else 1
        self.guidance = Guidance(1.0 if dist.teacher_cfg_scale is None else dist.teacher_cfg_scale,
                                 dist.teacher_cfg_mode or d.cfg_mode,
                                 max(cfg.model.context_noise, MIN_GUIDANCE_CONTEXT_NOISE))
        self.train_encoder = dist.train_encoder
        self.model_cfg = cfg.model

    def grid(self, device: torch.device) -> Tensor:
        return sample_sigmas(self.steps, self.schedule, self.num_train_timesteps, device)

    def targets(self, frames: int) -> list[int]:
        return [t for t in target_frame_indices(frames, self.target_window) if t >= self.first_target]

    def student_sampler(self) -> SamplerSettings:
        return SamplerSettings(steps=self.steps, cfg_scale=1.0, num_train_timesteps=self.num_train_timesteps,
                               schedule=self.schedule)

    def rollout(self, student: nn.Module, x0: Tensor, actions: Tensor | None) -> Tensor:
        """The clip with every frame after the first ``first_target`` generated by the student."""
        batch, frames = x0.shape[:2]
        first = self.first_target
        seed = int(torch.randint(0, 2**62, (1,)))  # from the checkpointed RNG: resumes reproduce it
        generator = torch.Generator(device=x0.device).manual_seed(seed)
        stream = new_stream(student, self.student_sampler(), batch, frames - 1, generator)
        stream.prefill(x0[:, :first], None if actions is None else actions[:, :first])
        generated = [stream.next_frame(None if actions is None else actions[:, j]) for j in range(first, frames)]
        return torch.cat([x0[:, :first], torch.stack(generated, dim=1).to(x0.dtype)], dim=1)

    def own_history(self, pair: DistillationPair, x0: Tensor, actions: Tensor | None) -> Tensor:
        """The clip the encoder reads: the data, or under self-rollout the student's own stream. A
        sharded student (FSDP2) is gathered for the rollout: the sampler reads its parameters
        outside the sharded blocks' forward."""
        if not self.self_rollout:
            return x0
        from scd_train.parallel.fsdp2 import gathered

        with gathered(pair):
            return self.rollout(pair.student, x0, actions)

    def integrate(self, velocity, start: Tensor, high: Tensor, low: Tensor) -> Tensor:
        """Euler from per-sample level ``high`` to ``low`` in ``substeps`` equal steps of ``velocity``."""
        x = start
        for j in range(self.substeps):
            s = high + (low - high) * (j / self.substeps)
            s_next = high + (low - high) * ((j + 1) / self.substeps)
            v = velocity(x, s * self.num_train_timesteps)
            x = x + _frames(s_next - s, x) * v.float()
        return x

    def student_states(self, velocity, noise: Tensor, segment: Tensor, grid: Tensor) -> Tensor:
        """The student's own state at ``grid[segment]``: its first ``segment`` steps from ``noise``."""
        x, states = noise, noise
        for i in range(self.steps - 1):
            v = velocity(x, grid[i].expand(x.shape[0]) * self.num_train_timesteps)
            x = x + (grid[i + 1] - grid[i]) * v.float()
            states = torch.where(_frames(segment == i + 1, x), x, states)
        return states


def _frames(per_sample: Tensor, like: Tensor) -> Tensor:
    """(S,) -> broadcastable over the (C, H, W) dims of ``like``."""
    return per_sample.reshape(per_sample.shape + (1,) * (like.dim() - per_sample.dim()))


class SCDTrajectory(TrajectoryMethod):
    """Every target frame of every clip at once: one encoder pass, ``decoder_multi_batch`` draws."""

    def predict(self, pair: DistillationPair, latents: Tensor, actions: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x0 = latents.float()
        batch, frames = x0.shape[:2]
        targets = self.targets(frames)
        with torch.no_grad():
            history = self.own_history(pair, x0, actions)
        enc_actions = None if actions is None else next_frame_actions(actions)
        teacher_encoder = pair.teacher.encoder or pair.encoder
        with torch.no_grad():
            teacher_ctx, uncond_ctx = self._contexts(teacher_encoder, history, enc_actions, targets, guide=True)
        if self.train_encoder:
            student_ctx, _ = self._contexts(pair.encoder, history, enc_actions, targets, guide=False)
        else:
            student_ctx = teacher_ctx  # the same frozen encoder

        def per_sample(t: Tensor | None) -> Tensor | None:  # (B, W, ...) -> (K*B*W, ...)
            return None if t is None else t.expand(self.draws, *t.shape).flatten(0, 2)

        dec_actions = None if actions is None else per_sample(actions[:, targets])
        teacher_ctx, uncond_ctx, student_ctx = map(per_sample, (teacher_ctx, uncond_ctx, student_ctx))
        samples = teacher_ctx.shape[0]
        grid = self.grid(x0.device)
        segment = torch.randint(0, self.steps, (samples,), device=x0.device)
        high, low = grid[segment], grid[segment + 1]
        noise = torch.randn((samples, *x0.shape[2:]), device=x0.device)
        student_v = _decoder_velocity(pair.decoder, student_ctx, None, dec_actions, Guidance())
        teacher_v = _decoder_velocity(pair.teacher.decoder, teacher_ctx, uncond_ctx, dec_actions, self.guidance)
        with torch.no_grad():
            if self.self_rollout:
                start = self.student_states(student_v, noise, segment, grid)
            else:
                start = add_noise(per_sample(x0[:, targets]), noise, high)
            end = self.integrate(teacher_v, start, high, low)
        target = (end - start) / _frames(low - high, start)
        prediction = pair.decoder(start, high * self.num_train_timesteps, student_ctx, dec_actions)
        mask = torch.ones(self.draws * batch, len(targets), dtype=torch.bool, device=x0.device)
        return prediction, target, mask

    def _contexts(self, encoder: nn.Module, history: Tensor, enc_actions: Tensor | None, targets: list[int],
                  guide: bool) -> tuple[Tensor, Tensor | None]:
        """Context tokens (B, W, N, D) for each target frame (the encoder output of the frame before)
        and, under guidance, the unconditional branch's."""
        previous = [t - 1 for t in targets]
        hidden, cond_act = _previous_frames(encoder, history, enc_actions, previous)
        context = encoder.output_head(hidden, cond_act)
        if not (guide and self.guidance.guided):
            return context, None
        if self.guidance.mode == "action":
            null = torch.full_like(enc_actions, encoder.action_embed.null_id)
            hidden_null, cond_null = _previous_frames(encoder, history, null, previous)
            return context, encoder.output_head(hidden_null, cond_null)
        noise = torch.randn(hidden.shape, device=hidden.device) * self.guidance.context_noise
        return context, encoder.output_head(hidden, cond_act, noise=noise)


def _previous_frames(encoder: nn.Module, history: Tensor, enc_actions: Tensor | None,
                     previous: list[int]) -> tuple[Tensor, Tensor]:
    hidden, cond_act = encoder.forward_hidden(history, enc_actions)
    n = encoder.tokens_per_frame
    hidden = hidden.unflatten(1, (history.shape[1], n))[:, previous].flatten(1, 2)
    return hidden, cond_act[:, previous]


def _decoder_velocity(decoder: nn.Module, context: Tensor, uncond: Tensor | None, actions: Tensor | None,
                      guidance: Guidance):
    """Velocity field of one SCD decoder under fixed contexts, both guidance branches in one call."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if not guidance.guided:
            return decoder(x, t, context, actions)
        uncond_actions = actions
        if guidance.mode == "action" and actions is not None:
            uncond_actions = torch.full_like(actions, decoder.action_embed.null_id)
        both = None if actions is None else torch.cat([actions, uncond_actions])
        v = decoder(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, uncond]), both)
        v_cond, v_uncond = v.chunk(2)
        return guided_velocity(v_cond.float(), v_uncond.float(), guidance.scale)

    return velocity


class DenseTrajectory(TrajectoryMethod):
    """The dense baseline, whose "decoder" is the whole stack: each sample is a clip with one target
    frame t (a random one), clean frames before it and the noisy state at t. Frames after t do not
    reach t through the frame-causal mask, so every sample has the clip's shape."""

    def predict(self, pair: DistillationPair, latents: Tensor, actions: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x0 = latents.float()
        batch, frames = x0.shape[:2]
        with torch.no_grad():
            history = self.own_history(pair, x0, actions)
        clips = history.repeat(self.draws, *([1] * (history.dim() - 1)))
        clip_actions = None if actions is None else actions.repeat(self.draws, 1)
        samples = clips.shape[0]
        candidates = torch.tensor(self.targets(frames), device=x0.device)
        frame = candidates[torch.randint(0, len(candidates), (samples,), device=x0.device)]
        grid = self.grid(x0.device)
        segment = torch.randint(0, self.steps, (samples,), device=x0.device)
        high, low = grid[segment], grid[segment + 1]
        noise = torch.randn((samples, *x0.shape[2:]), device=x0.device)
        student_v = _dense_velocity(pair.student, clips, clip_actions, frame, Guidance())
        teacher_v = _dense_velocity(pair.teacher, clips, clip_actions, frame, self.guidance)
        rows = torch.arange(samples, device=x0.device)
        with torch.no_grad():
            if self.self_rollout:
                start = self.student_states(student_v, noise, segment, grid)
            else:
                start = add_noise(clips[rows, frame], noise, high)
            end = self.integrate(teacher_v, start, high, low)
        target = (end - start) / _frames(low - high, start)
        prediction = student_v(start, high * self.num_train_timesteps)
        mask = torch.ones(samples, 1, dtype=torch.bool, device=x0.device)
        return prediction, target, mask


def _dense_velocity(model: nn.Module, clips: Tensor, actions: Tensor | None, frame: Tensor, guidance: Guidance):
    """Velocity at frame ``frame[s]`` of clip s when that frame holds x at timestep t and the frames
    before it are clean: what the cached streaming sampler computes, in one uncached pass."""
    rows = torch.arange(clips.shape[0], device=clips.device)
    clean = torch.full(clips.shape[:2], CLEAN_TIMESTEP, device=clips.device)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        latents = clips.clone()
        latents[rows, frame] = x.to(latents.dtype)
        timesteps = clean.clone()
        timesteps[rows, frame] = t.float()
        if not guidance.guided:
            return model(latents, timesteps, actions)[rows, frame]
        null = torch.full_like(actions, model.action_embed.null_id)
        out = model(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([actions, null]))
        v_cond, v_uncond = out.chunk(2)
        return guided_velocity(v_cond[rows, frame].float(), v_uncond[rows, frame].float(), guidance.scale)

    return velocity


def build_method(cfg: Config) -> TrajectoryMethod:
    if cfg.distill.method != "trajectory":
        raise ValueError(f"distill.method={cfg.distill.method!r} is not implemented")
    return SCDTrajectory(cfg) if cfg.model.arch == "scd" else DenseTrajectory(cfg)


class DistillObjective:
    """MSE between the student's velocities and the teacher's segment velocities, per frame, mean
    over each clip's target frames, then over clips (as the training objectives)."""

    def __call__(self, model: nn.Module, latents: Tensor, actions: Tensor | None) -> LossOutput:
        prediction, target, mask = model(latents, actions)
        frame_loss = per_frame_mse(prediction, target, frame_dims=1).view(mask.shape)
        return LossOutput(masked_clip_mean(frame_loss, mask), mask.float().mean())


def distill_step_flops(cfg: Config, clip_frames: int | None = None) -> StepFlops:
    """Analytic FLOPs of one distillation step on one rank: the teacher's no-grad sub-steps count
    once, the student's pass three times (forward + backward)."""
    m, d, dist = cfg.model, cfg.diffusion, cfg.distill
    frames = clip_frames or cfg.data.clip_frames
    clips = cfg.data.batch_size * cfg.train.grad_accum
    first = dist.rollout_context_frames if dist.self_rollout else 1
    window = frames - 1 if d.target_window is None else min(d.target_window, frames - 1)
    targets = min(window, frames - first)
    k = d.sample_steps
    guided = dist.teacher_cfg_scale is not None and dist.teacher_cfg_scale != 1.0
    calls = teacher_substeps(dist.teacher_steps or k, k) * (2 if guided else 1)
    own_states = (k - 1) if dist.self_rollout else 0
    generated = frames - first if dist.self_rollout else 0
    if m.arch == "scd":
        samples = d.decoder_multi_batch * targets
        action_guided = guided and (dist.teacher_cfg_mode or d.cfg_mode) == "action"
        encoder = 1 + (1 if action_guided else 0) + (3 if dist.train_encoder else 0)
        enc = clips * (encoder * encoder_forward(m, frames) + generated * encoder_forward(m, 1, frames))
        dec = clips * (decoder_forward(m, samples) * (calls + 3 + own_states) + generated * k * decoder_forward(m, 1))
        return StepFlops(enc, dec)
    whole_clip = d.decoder_multi_batch * (calls + 3 + own_states) * causal_dit_forward(m, frames)
    rollout = generated * (k + 1) * causal_dit_forward(m, 1, frames)  # one frame over the cache per pass
    return StepFlops(clips * (whole_clip + rollout), 0.0)
