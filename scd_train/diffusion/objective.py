"""Training objectives: per-frame flow matching for SCD and for the dense baseline.

Both draw per-frame timesteps and clean-context masks, noise in fp32, and average the per-frame
MSE over noised target frames of each clip, then over clips. ``decoder_multi_batch`` K gives the
SCD decoder K independent noise draws per encoder pass, batched into one decoder call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scd_train.config import DiffusionConfig, ModelConfig
from scd_train.diffusion.flow import (
    add_noise,
    clean_timesteps_where,
    masked_clip_mean,
    per_frame_mse,
    sample_clean_mask,
    sample_timesteps,
    sigmas_from_timesteps,
    velocity_target,
)


def next_frame_actions(actions: Tensor) -> Tensor:
    """Encoder alignment: frame i carries action i+1; the last frame repeats the final action."""
    return torch.cat([actions[:, 1:], actions[:, -1:]], dim=1)


def target_frame_indices(frames: int, window: int | None) -> range:
    """The trailing min(window, F-1) frames; frame 0 is never a target."""
    count = frames - 1 if window is None else min(window, frames - 1)
    return range(frames - count, frames)


@dataclass
class NoiseDraw:
    timesteps: Tensor  # (B, F), clean frames labelled -1
    clean: Tensor  # (B, F) bool
    noise: Tensor  # (B, F, C, H, W)
    noisy: Tensor  # (B, F, C, H, W)


@dataclass
class LossOutput:
    loss: Tensor
    noised_fraction: Tensor  # share of target frames that carry loss (not clean)


class FlowObjective:
    def __init__(self, cfg: DiffusionConfig, model_cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg

    def draw(self, x0: Tensor) -> NoiseDraw:
        batch, frames = x0.shape[:2]
        cfg = self.cfg
        timesteps = sample_timesteps((batch, frames), cfg.num_train_timesteps, cfg.logit_mean, cfg.logit_std,
                                     x0.device)
        clean = sample_clean_mask(batch, frames, cfg.clean_context_ratio, x0.device)
        timesteps = clean_timesteps_where(timesteps, clean)
        # with bf16 latents (reference_bf16_inputs) the noise, the noise level and the noisy frames
        # are bf16 too, as in the release; the model's timestep embedding rounds separately
        # (model.reference_bf16_timesteps)
        noise = torch.randn_like(x0)
        noisy = add_noise(x0, noise, sigmas_from_timesteps(timesteps, cfg.num_train_timesteps).to(x0.dtype))
        return NoiseDraw(timesteps, clean, noise, noisy)

    def prepare_latents(self, latents: Tensor) -> Tensor:
        """fp32 latents, or bf16 ones when reproducing the release's quantized noise."""
        return latents.bfloat16() if self.cfg.reference_bf16_inputs else latents.float()


class SCDObjective(FlowObjective):
    def __call__(self, model: nn.Module, latents: Tensor, actions: Tensor | None) -> LossOutput:
        x0 = self.prepare_latents(latents)
        batch, frames = x0.shape[:2]
        targets = torch.tensor(list(target_frame_indices(frames, self.cfg.target_window)), device=x0.device)
        draws = [self.draw(x0) for _ in range(self.cfg.decoder_multi_batch)]
        encoder_in = x0 if self.model_cfg.encoder_input == "clean" else draws[0].noisy

        def per_draw(name: str) -> Tensor:  # (K, B, W, ...) -> (K*B*W, ...)
            stacked = torch.stack([getattr(d, name)[:, targets] for d in draws])
            return stacked.flatten(0, 2)

        k = len(draws)
        clip_base = (torch.arange(batch, device=x0.device) * frames)[:, None]
        context_index = (clip_base + targets[None] - 1).expand(k, -1, -1).flatten()
        decoder_actions = None
        if actions is not None:
            decoder_actions = self.decoder_actions(actions, targets, k).flatten()
        pred = model(
            encoder_in, next_frame_actions(actions) if actions is not None else None,
            per_draw("noisy"), per_draw("timesteps"), decoder_actions, context_index)
        clean_targets = x0[None, :, targets].expand(k, *([-1] * x0.dim())).flatten(0, 2)
        target = velocity_target(clean_targets, per_draw("noise"))
        frame_loss = per_frame_mse(pred, target, frame_dims=1).view(k * batch, len(targets))
        loss_mask = ~per_draw("clean").view(k * batch, len(targets))
        return LossOutput(masked_clip_mean(frame_loss, loss_mask), loss_mask.float().mean())

    def decoder_actions(self, actions: Tensor, targets: Tensor, draws: int) -> Tensor:
        """(K, B, W) action of each decoder sample: target frame t's own action, except in the first
        draw under ``reference_first_pass_next_action``, where it is the encoder's action t+1."""
        own = actions[:, targets]
        if not self.cfg.reference_first_pass_next_action:
            return own.expand(draws, -1, -1)
        shifted = next_frame_actions(actions)[:, targets]
        return torch.stack([shifted] + [own] * (draws - 1))


class CausalDiTObjective(FlowObjective):
    """Every frame noised at its own level; the history each frame reads is ``model.encoder_input``:
    the noised frames before it under the frame-causal mask (diffusion forcing, "noisy") or a clean
    copy of them (teacher forcing, "clean").

    ``decoder_multi_batch`` K repeats the clip K times with fresh noise, so both models see the same
    number of noise draws per clip.
    """

    def __call__(self, model: nn.Module, latents: Tensor, actions: Tensor | None) -> LossOutput:
        x0 = self.prepare_latents(latents)
        k = self.cfg.decoder_multi_batch
        x0 = x0.repeat(k, *([1] * (x0.dim() - 1)))
        actions = actions.repeat(k, 1) if actions is not None else None
        frames = x0.shape[1]
        targets = list(target_frame_indices(frames, self.cfg.target_window))
        draw = self.draw(x0)
        # noisy history: the noised clip attends to itself frame-causally (diffusion forcing);
        # clean history: each noisy frame attends to a clean copy of the frames before it
        if self.model_cfg.encoder_input == "clean":
            pred = model(draw.noisy, draw.timesteps, actions, clean_history=x0)
        else:
            pred = model(draw.noisy, draw.timesteps, actions)
        target = velocity_target(x0, draw.noise)
        frame_loss = per_frame_mse(pred[:, targets], target[:, targets], frame_dims=2)
        loss_mask = ~draw.clean[:, targets]
        return LossOutput(masked_clip_mean(frame_loss, loss_mask), loss_mask.float().mean())


def build_objective(model_cfg: ModelConfig, cfg: DiffusionConfig) -> FlowObjective:
    kind = SCDObjective if model_cfg.arch == "scd" else CausalDiTObjective
    return kind(cfg, model_cfg)
