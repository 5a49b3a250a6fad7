"""The causal encoder: runs once per frame over the clean history and emits context tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_train.config import ModelConfig
from scd_train.models.attention import KVCache, build_frame_causal_mask
from scd_train.models.block import BlockContext, DiTBlock
from scd_train.models.layers import (
    CLEAN_TIMESTEP,
    ActionEmbedding,
    AdaptiveOutputNorm,
    PatchEmbed,
    TimestepEmbedding,
    init_conditioning,
    init_linear_xavier,
    silu,
    zero_,
)
from scd_train.models.rope import rope_angles, round_through_bf16, token_positions


class CausalEncoder(nn.Module):
    """Frame-block-causal transformer over latent frames, always at the clean timestep.

    ``actions`` are already aligned to the input frames: frame i carries the action that leads to
    frame i+1 (see ``scd_train.diffusion.objective.next_frame_actions``). The output for frame i
    is the context the decoder uses to render frame i+1.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.latent_channels, cfg.patch_size, cfg.width)
        self.time_embed = TimestepEmbedding(cfg.width, cfg.reference_bf16_timesteps)
        self.action_embed = (ActionEmbedding(cfg.num_actions, cfg.width, cfg.action_dropout)
                             if cfg.num_actions > 0 else None)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.encoder_layers))
        self.output_norm = AdaptiveOutputNorm(cfg.width)
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

    def conditioning(self, actions: Tensor | None, batch: int, frames: int, device: torch.device) -> Tensor:
        """Per-frame conditioning (B, F, D): the clean-timestep embedding plus the action."""
        t = torch.full((1,), CLEAN_TIMESTEP, device=device)
        cond = self.time_embed(t).expand(batch, frames, -1)
        if self.action_embed is not None:
            if actions is None:
                actions = torch.full((batch, frames), self.action_embed.null_id, device=device, dtype=torch.long)
            cond = cond + self.action_embed(actions)
        return cond

    def forward_hidden(self, latents: Tensor, actions: Tensor | None = None, kv_cache: KVCache | None = None,
                       frame_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Last hidden state (B, F*N, D) and the SiLU'd conditioning (B, F, D).

        With a KV cache, ``latents`` are the frames after the ones already cached and
        ``frame_offset`` is their absolute index.
        """
        batch, frames = latents.shape[:2]
        self._check_frames(frame_offset + frames)
        n = self.tokens_per_frame
        cond_act = silu(self.conditioning(actions, batch, frames, latents.device))
        x = self.patch_embed(latents)
        rows = self.cfg.latent_height // self.cfg.patch_size
        cols = self.cfg.latent_width // self.cfg.patch_size
        positions = token_positions(frame_offset, frames, rows, cols, latents.device)
        if self.cfg.reference_bf16_rope:
            positions = round_through_bf16(positions)
        kv_frames = frame_offset + frames if kv_cache is not None else frames
        mask = build_frame_causal_mask(frames, kv_frames, n, latents.device, self.cfg.attention)
        ctx = BlockContext(cond_act, n, rope_angles(positions, self.cfg.rope_axes, self.cfg.rope_theta),
                           mask, kv_cache)
        for index, block in enumerate(self.blocks):
            x = block(x, ctx, index)
        if kv_cache is not None:
            kv_cache.advance(frames * n)
        return x, cond_act

    def output_head(self, hidden: Tensor, cond_act: Tensor, noise_std: float = 0.0,
                    noise: Tensor | None = None) -> Tensor:
        """Context tokens (B, F, N, D): normalized (optionally perturbed) and modulated."""
        if noise is None and noise_std > 0:
            noise = torch.randn(hidden.shape, device=hidden.device, dtype=torch.float32) * noise_std
        out = self.output_norm(hidden, cond_act, self.tokens_per_frame, noise)
        return out.unflatten(1, (-1, self.tokens_per_frame))

    def forward(self, latents: Tensor, actions: Tensor | None = None, kv_cache: KVCache | None = None,
                frame_offset: int = 0) -> Tensor:
        """Context tokens (B, F, N, D); context noise is added in training mode only."""
        hidden, cond_act = self.forward_hidden(latents, actions, kv_cache, frame_offset)
        noise_std = self.cfg.context_noise if self.training else 0.0
        return self.output_head(hidden, cond_act, noise_std)

    def new_kv_cache(self, batch: int, capacity_frames: int, dtype: torch.dtype, device) -> KVCache:
        self._check_frames(capacity_frames)
        return KVCache(len(self.blocks), batch, self.cfg.num_heads, capacity_frames * self.tokens_per_frame,
                       self.cfg.head_dim, dtype, device)

    def _check_frames(self, frames: int) -> None:
        if frames > self.cfg.max_frames:
            raise ValueError(
                f"{frames} frames exceed model.max_frames={self.cfg.max_frames}; shorten the context/rollout "
                "or raise model.max_frames (RoPE extrapolates, but quality beyond training length is unchecked)")
