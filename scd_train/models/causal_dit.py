"""The dense causal diffusion transformer: every layer frame-causal at every denoising step.

This is the conventional design SCD is measured against: the same block, width, RoPE and action
conditioning, with all layers re-run over the noisy frame (attending to the cached clean context)
at each of the T sampling steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_train.config import ModelConfig
from scd_train.models.attention import KVCache, build_frame_causal_mask, build_teacher_forcing_mask
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
    unpatchify,
    zero_,
)
from scd_train.models.rope import rope_angles, round_through_bf16, token_positions


class CausalDiT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.latent_channels, cfg.patch_size, cfg.width)
        self.time_embed = TimestepEmbedding(cfg.width, cfg.reference_bf16_timesteps)
        self.action_embed = (ActionEmbedding(cfg.num_actions, cfg.width, cfg.action_dropout)
                             if cfg.num_actions > 0 else None)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.output_norm = AdaptiveOutputNorm(cfg.width)
        self.proj_out = nn.Linear(cfg.width, cfg.latent_channels * cfg.patch_size**2)
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

    def forward(self, latents: Tensor, timesteps: Tensor, actions: Tensor | None = None,
                kv_cache: KVCache | None = None, frame_offset: int = 0, commit: bool = True,
                clean_history: Tensor | None = None) -> Tensor:
        """Velocity (B, F, C, H, W) for frames (B, F, C, H, W) at per-frame ``timesteps`` (B, F).

        Frame t carries its own action t. With a KV cache, ``latents`` follow the cached frames;
        ``commit=False`` attends to the cache without keeping the new keys (a denoising step).

        ``clean_history`` (B, F, C, H, W) trains with teacher forcing: the clean frames run beside
        the noisy ones at the clean label, with the same actions and positions, and noisy frame t
        reads clean frames < t instead of the noisy ones (see ``teacher_forcing_mask``).
        """
        batch, frames = latents.shape[:2]
        if frame_offset + frames > self.cfg.max_frames:
            raise ValueError(f"{frame_offset + frames} frames exceed model.max_frames={self.cfg.max_frames}")
        if clean_history is not None and kv_cache is not None:
            raise ValueError("clean_history is for training passes over whole clips; it takes no KV cache")
        n = self.tokens_per_frame
        rows = self.cfg.latent_height // self.cfg.patch_size
        cols = self.cfg.latent_width // self.cfg.patch_size
        positions = token_positions(frame_offset, frames, rows, cols, latents.device)
        if self.cfg.reference_bf16_rope:
            positions = round_through_bf16(positions)
        if clean_history is None:
            kv_frames = frame_offset + frames if kv_cache is not None else frames
            mask = build_frame_causal_mask(frames, kv_frames, n, latents.device, self.cfg.attention)
        else:
            latents = torch.cat([clean_history.to(latents.dtype), latents], dim=1)
            timesteps = torch.cat([torch.full_like(timesteps, CLEAN_TIMESTEP), timesteps], dim=1)
            positions = positions.repeat(2, 1)
            mask = build_teacher_forcing_mask(frames, n, latents.device, self.cfg.attention)
        cond = self.time_embed(timesteps)
        if self.action_embed is not None:
            if actions is None:
                actions = torch.full((batch, frames), self.action_embed.null_id, device=latents.device,
                                     dtype=torch.long)
            action_emb = self.action_embed(actions)  # one dropout draw per frame, shared by both copies
            cond = cond + (action_emb if clean_history is None else torch.cat([action_emb, action_emb], dim=1))
        cond_act = silu(cond)
        x = self.patch_embed(latents)
        ctx = BlockContext(cond_act, n, rope_angles(positions, self.cfg.rope_axes, self.cfg.rope_theta), mask,
                           kv_cache)
        for index, block in enumerate(self.blocks):
            x = block(x, ctx, index)
        if kv_cache is not None and commit:
            kv_cache.advance(frames * n)
        x = self.output_norm(x[:, -frames * n:], cond_act[:, -frames:], n)
        return unpatchify(self.proj_out(x), frames, self.cfg.latent_channels, self.cfg.latent_height,
                          self.cfg.latent_width, self.cfg.patch_size)

    def new_kv_cache(self, batch: int, capacity_frames: int, dtype: torch.dtype, device) -> KVCache:
        if capacity_frames > self.cfg.max_frames:
            raise ValueError(f"{capacity_frames} frames exceed model.max_frames={self.cfg.max_frames}")
        return KVCache(len(self.blocks), batch, self.cfg.num_heads, capacity_frames * self.tokens_per_frame,
                       self.cfg.head_dim, dtype, device)
