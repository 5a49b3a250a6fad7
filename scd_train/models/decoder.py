"""The frame-wise diffusion decoder: renders frame t from its noisy tokens and encoder context t-1."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_train.config import ModelConfig
from scd_train.models.block import BlockContext, DiTBlock, StepConditioning, StepsConditioning
from scd_train.models.layers import (
    ActionEmbedding,
    AdaptiveOutputNorm,
    PatchEmbed,
    TimestepEmbedding,
    embed_conditioning,
    init_conditioning,
    init_linear_xavier,
    unpatchify,
    zero_,
)
from scd_train.models.rope import RotaryTables


class FrameDecoder(nn.Module):
    """Unmasked attention over one frame: [encoder tokens of t-1 ; noisy tokens of t].

    Both halves carry identical RoPE ids (frame 0, same row and column). The decoder never sees
    other frames and keeps no cache; its only view of the past is the context tokens.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.latent_channels, cfg.patch_size, cfg.width)
        self.time_embed = TimestepEmbedding(cfg.width, cfg.reference_bf16_timesteps)
        self.action_embed = (ActionEmbedding(cfg.num_actions, cfg.width, cfg.action_dropout)
                             if cfg.num_actions > 0 else None)
        self.fuse = nn.Linear(2 * cfg.width, cfg.width) if cfg.fusion == "channel_concat" else None
        # token_concat_with_proj: LayerNorm + Linear on the context tokens before they join the sequence
        self.context_align = (nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.width))
                              if cfg.fusion == "token_concat_with_proj" else None)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.decoder_layers))
        self.output_norm = AdaptiveOutputNorm(cfg.width)
        self.proj_out = nn.Linear(cfg.width, cfg.latent_channels * cfg.patch_size**2)
        self.rotary = RotaryTables(cfg.rope_axes, cfg.rope_theta, cfg.latent_height // cfg.patch_size,
                                   cfg.latent_width // cfg.patch_size)
        self.reset_parameters()

    @property
    def tokens_per_frame(self) -> int:
        return (self.cfg.latent_height // self.cfg.patch_size) * (self.cfg.latent_width // self.cfg.patch_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_linear_xavier(self)
        init_conditioning(self.time_embed, self.action_embed)
        for block in self.blocks:
            block.init_weights()
        zero_(self.output_norm.modulation)
        zero_(self.proj_out)
        if self.fuse is not None:
            eye = torch.eye(self.cfg.width)
            self.fuse.weight.copy_(torch.cat([eye, eye], dim=1))  # starts as context + noisy
        if self.context_align is not None:
            # as in the release: a unit LayerNorm and a zero Linear, so the decoder starts from zero
            # context tokens and learns how much of the encoder's output to let in
            self.context_align[0].reset_parameters()
            zero_(self.context_align[1])

    def conditioning(self, timesteps: Tensor, actions: Tensor | None = None) -> Tensor:
        """SiLU'd conditioning (..., 1, D) of timesteps (...) and actions (...): one "frame" per sample."""
        return embed_conditioning(self.time_embed, self.action_embed, timesteps, actions)[..., None, :]

    def step_conditioning(self, timesteps: Tensor, actions: Tensor | None = None) -> StepsConditioning:
        """The conditioning of T sampling steps at once: ``timesteps`` (T, B') and per-sample
        ``actions`` (B',) shared by the steps; pass ``.steps()[i]`` to ``forward`` at step i."""
        if actions is not None:
            actions = actions.expand(timesteps.shape)
        return StepsConditioning.of(self.conditioning(timesteps, actions), self.blocks, self.output_norm,
                                    one_frame=True)

    def forward(self, noisy: Tensor, timesteps: Tensor, context: Tensor, actions: Tensor | None = None,
                conditioning: StepConditioning | None = None) -> Tensor:
        """Velocity (B', C, H, W) for noisy frames (B', C, H, W) at ``timesteps`` (B',).

        ``context`` (B', N, D) holds the encoder tokens of each sample's previous frame.
        ``conditioning`` (from ``step_conditioning``) replaces ``timesteps`` and ``actions``.
        """
        n = self.tokens_per_frame
        if conditioning is None:
            cond_act, modulation, output_terms = self.conditioning(timesteps, actions), None, None
        else:
            cond_act, modulation, output_terms = conditioning.cond_act, conditioning.blocks, conditioning.output
        x_noisy = self.patch_embed(noisy[:, None])
        x, group = self._fuse(context if context.dtype == x_noisy.dtype else context.to(x_noisy.dtype), x_noisy)
        rope = self.rotary.repeated(0, group, noisy.device)
        ctx = BlockContext(cond_act, group * n, rope, mask=None, modulation=modulation)
        for index, block in enumerate(self.blocks):
            x = block(x, ctx, index)
        x = self.output_norm(x[:, -n:], cond_act, n, terms=output_terms)
        out = unpatchify(self.proj_out(x), 1, self.cfg.latent_channels, self.cfg.latent_height,
                         self.cfg.latent_width, self.cfg.patch_size)
        return out[:, 0]

    def _fuse(self, context: Tensor, noisy_tokens: Tensor) -> tuple[Tensor, int]:
        """Fused token sequence and how many N-token groups it holds."""
        if self.cfg.fusion in ("token_concat", "token_concat_with_proj"):
            if self.context_align is not None:
                context = self.context_align(context)
            return torch.cat([context, noisy_tokens], dim=1), 2
        if self.cfg.fusion == "add":
            return context + noisy_tokens, 1
        return self.fuse(torch.cat([context, noisy_tokens], dim=-1)), 1
