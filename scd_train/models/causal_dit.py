"""The dense causal diffusion transformer: every layer frame-causal at every denoising step.

This is the conventional design SCD is measured against: the same block, width, RoPE and action
conditioning, with all layers re-run over the noisy frame (attending to the cached clean context)
at each of the T sampling steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_train.config import ModelConfig
from scd_train.models.attention import (
    AttentionWindow,
    KVCache,
    RingKVCache,
    build_teacher_forcing_mask,
    frame_attention_inputs,
    new_kv_cache,
)
from scd_train.models.block import BlockContext, DiTBlock, StepConditioning, StepsConditioning
from scd_train.models.layers import (
    CLEAN_TIMESTEP,
    ActionEmbedding,
    AdaptiveOutputNorm,
    PatchEmbed,
    TimestepEmbedding,
    embed_conditioning,
    init_conditioning,
    init_linear_xavier,
    silu,
    unpatchify,
    zero_,
)
from scd_train.models.rope import RotaryTables


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
        self.window = AttentionWindow.of(cfg)  # the same window option as SCD's encoder
        self.rotary = RotaryTables(cfg.rope_axes, cfg.rope_theta, cfg.latent_height // cfg.patch_size,
                                   cfg.latent_width // cfg.patch_size, cfg.reference_bf16_rope)
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

    @property
    def stream_frame_limit(self) -> int | None:
        """Frames a stream may hold in all (context + generated); None: unbounded (a window)."""
        return self.window.stream_limit(self.cfg.max_frames)

    def conditioning(self, timesteps: Tensor, actions: Tensor | None = None) -> Tensor:
        """SiLU'd per-frame conditioning (..., F, D) of timesteps (..., F) and actions (..., F)."""
        return embed_conditioning(self.time_embed, self.action_embed, timesteps, actions)

    def step_conditioning(self, timesteps: Tensor, actions: Tensor | None = None) -> StepsConditioning:
        """The conditioning of T denoising steps of one frame at once: ``timesteps`` (T, B, 1) and
        ``actions`` (B, 1) shared by the steps; pass ``.steps()[i]`` to ``forward`` at step i."""
        if actions is not None:
            actions = actions.expand(timesteps.shape)
        return StepsConditioning.of(self.conditioning(timesteps, actions), self.blocks, self.output_norm)

    def forward(self, latents: Tensor, timesteps: Tensor, actions: Tensor | None = None,
                kv_cache: KVCache | RingKVCache | None = None, frame_offset: int = 0, commit: bool = True,
                conditioning: StepConditioning | None = None, clean_history: Tensor | None = None) -> Tensor:
        """Velocity (B, F, C, H, W) for frames (B, F, C, H, W) at per-frame ``timesteps`` (B, F).

        Frame t carries its own action t. With a KV cache, ``latents`` follow the cached frames;
        ``commit=False`` attends to the cache without keeping the new keys (a denoising step).
        ``conditioning`` (from ``step_conditioning``) replaces ``timesteps`` and ``actions``.

        ``clean_history`` (B, F, C, H, W) trains with teacher forcing: the clean frames run beside
        the noisy ones at the clean label, with the same actions and positions, and noisy frame t
        reads clean frames < t instead of the noisy ones (see ``teacher_forcing_mask``).
        """
        batch, frames = latents.shape[:2]
        if not isinstance(kv_cache, RingKVCache) and frame_offset + frames > self.cfg.max_frames:
            raise ValueError(f"{frame_offset + frames} frames exceed model.max_frames={self.cfg.max_frames}")
        if clean_history is not None:
            return self._teacher_forced(latents, timesteps, actions, clean_history, frame_offset, kv_cache)
        n = self.tokens_per_frame
        if conditioning is None:
            cond_act, modulation, output_terms = self.conditioning(timesteps, actions), None, None
        else:
            cond_act, modulation, output_terms = conditioning.cond_act, conditioning.blocks, conditioning.output
        x = self.patch_embed(latents)
        if kv_cache is None:
            x = self._blocks(x, cond_act, modulation, frame_offset, None)
        else:
            pieces = kv_cache.pieces(frame_offset, frames)
            if not commit and len(pieces) > 1:
                raise ValueError("a denoising pass (commit=False) over a windowed cache takes one frame at a time")
            parts = []
            for first, count in pieces:
                lo = first - frame_offset
                mods = modulation if len(pieces) == 1 or modulation is None else [
                    tuple(t[:, lo:lo + count] for t in terms) for terms in modulation]
                parts.append(self._blocks(x[:, lo * n:(lo + count) * n], cond_act[:, lo:lo + count], mods, first,
                                          kv_cache))
                if commit:
                    kv_cache.advance(count * n)
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        x = self.output_norm(x, cond_act, n, terms=output_terms)
        return unpatchify(self.proj_out(x), frames, self.cfg.latent_channels, self.cfg.latent_height,
                          self.cfg.latent_width, self.cfg.patch_size)

    def _teacher_forced(self, latents: Tensor, timesteps: Tensor, actions: Tensor | None, clean_history: Tensor,
                        frame_offset: int, kv_cache) -> Tensor:
        """One training pass over [clean frames ; noisy frames] under the teacher-forcing mask."""
        if kv_cache is not None:
            raise ValueError("clean_history is for training passes over whole clips; it takes no KV cache")
        if self.window.bounded:
            raise ValueError("teacher forcing (clean_history) has no windowed mask; train the windowed dense "
                             "baseline with model.encoder_input='noisy'")
        batch, frames = latents.shape[:2]
        n = self.tokens_per_frame
        both = torch.cat([clean_history.to(latents.dtype), latents], dim=1)
        cond = self.time_embed(torch.cat([torch.full_like(timesteps, CLEAN_TIMESTEP), timesteps], dim=1))
        if self.action_embed is not None:
            if actions is None:
                actions = torch.full((batch, frames), self.action_embed.null_id, device=latents.device,
                                     dtype=torch.long)
            action_emb = self.action_embed(actions)  # one dropout draw per frame, shared by both copies
            cond = cond + torch.cat([action_emb, action_emb], dim=1)
        cond_act = silu(cond)
        cos, sin = self.rotary.frames(frame_offset, frames, latents.device)  # both copies share positions
        mask = build_teacher_forcing_mask(frames, n, latents.device, self.cfg.attention)
        ctx = BlockContext(cond_act, n, (cos.repeat(2, 1), sin.repeat(2, 1)), mask)
        x = self.patch_embed(both)
        for index, block in enumerate(self.blocks):
            x = block(x, ctx, index)
        x = self.output_norm(x[:, -frames * n:], cond_act[:, -frames:], n)
        return unpatchify(self.proj_out(x), frames, self.cfg.latent_channels, self.cfg.latent_height,
                          self.cfg.latent_width, self.cfg.patch_size)

    def _blocks(self, x: Tensor, cond_act: Tensor, modulation, first: int,
                kv_cache: KVCache | RingKVCache | None) -> Tensor:
        n, frames = self.tokens_per_frame, cond_act.shape[1]
        mask, copies, rope = frame_attention_inputs(self.window, self.rotary, self.cfg.attention, frames, first,
                                                    kv_cache, x.device)
        ctx = BlockContext(cond_act, n, rope, mask, kv_cache, copies, modulation)
        for index, block in enumerate(self.blocks):
            x = block(x, ctx, index)
        return x

    def new_kv_cache(self, batch: int, capacity_frames: int | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu") -> KVCache | RingKVCache:
        """A ring of S + W frames for a window (``capacity_frames`` ignored), else the full history
        of ``capacity_frames`` frames; see ``CausalEncoder.new_kv_cache``."""
        if not self.window.bounded and capacity_frames is not None and capacity_frames > self.cfg.max_frames:
            raise ValueError(f"{capacity_frames} frames exceed model.max_frames={self.cfg.max_frames}")
        return new_kv_cache(self.window, len(self.blocks), batch, self.cfg.num_heads, self.cfg.head_dim,
                            self.rotary, capacity_frames, dtype, device)
