"""The causal encoder: runs once per frame over the clean history and emits context tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_train.config import ModelConfig
from scd_train.models.attention import (
    AttentionWindow,
    KVCache,
    RingKVCache,
    frame_attention_inputs,
    new_kv_cache,
)
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
from scd_train.models.rope import RotaryTables


class CausalEncoder(nn.Module):
    """Frame-block-causal transformer over latent frames, always at the clean timestep.

    ``actions`` are already aligned to the input frames: frame i carries the action that leads to
    frame i+1 (see ``scd_train.diffusion.objective.next_frame_actions``). The output for frame i
    is the context the decoder uses to render frame i+1.

    ``model.encoder_window`` bounds the history each frame attends to (the mask in training, a
    ring-buffer KV cache at inference); the frame positions follow the rule written down in
    ``scd_train.models.attention``.
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
        self.window = AttentionWindow.of(cfg)
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

    def conditioning(self, actions: Tensor | None, batch: int, frames: int, device: torch.device) -> Tensor:
        """Per-frame conditioning (B, F, D): the clean-timestep embedding plus the action."""
        t = torch.full((1,), CLEAN_TIMESTEP, device=device)
        cond = self.time_embed(t).expand(batch, frames, -1)
        if self.action_embed is not None:
            if actions is None:
                actions = torch.full((batch, frames), self.action_embed.null_id, device=device, dtype=torch.long)
            cond = cond + self.action_embed(actions)
        return cond

    def forward_hidden(self, latents: Tensor, actions: Tensor | None = None,
                       kv_cache: KVCache | RingKVCache | None = None, frame_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Last hidden state (B, F*N, D) and the SiLU'd conditioning (B, F, D).

        With a KV cache, ``latents`` are the frames after the ones already cached and
        ``frame_offset`` is their absolute index.
        """
        batch, frames = latents.shape[:2]
        if not isinstance(kv_cache, RingKVCache):  # a ring keeps every position below S + W
            self._check_frames(frame_offset + frames)
        n = self.tokens_per_frame
        cond_act = silu(self.conditioning(actions, batch, frames, latents.device))
        x = self.patch_embed(latents)
        if kv_cache is None:
            return self._blocks(x, cond_act, frame_offset, None), cond_act
        parts = []
        for first, count in kv_cache.pieces(frame_offset, frames):
            lo = first - frame_offset
            parts.append(self._blocks(x[:, lo * n:(lo + count) * n], cond_act[:, lo:lo + count], first, kv_cache))
            kv_cache.advance(count * n)
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), cond_act

    def _blocks(self, x: Tensor, cond_act: Tensor, first: int, kv_cache: KVCache | RingKVCache | None) -> Tensor:
        """The transformer blocks over frames first.. of ``x``, after the cached ones."""
        n, frames = self.tokens_per_frame, cond_act.shape[1]
        mask, copies, rope = frame_attention_inputs(self.window, self.rotary, self.cfg.attention, frames, first,
                                                    kv_cache, x.device)
        ctx = BlockContext(cond_act, n, rope, mask, kv_cache, copies)
        for index, block in enumerate(self.blocks):
            x = block(x, ctx, index)
        return x

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

    def new_kv_cache(self, batch: int, capacity_frames: int | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu") -> KVCache | RingKVCache:
        """The cache policy of ``model.encoder_window``: a fixed ring of S + W frames for a window
        (``capacity_frames`` ignored), else the full history of ``capacity_frames`` frames. The
        storage takes the dtype attention computes in at the first write unless ``dtype`` is given."""
        if not self.window.bounded and capacity_frames is not None:
            self._check_frames(capacity_frames)
        return new_kv_cache(self.window, len(self.blocks), batch, self.cfg.num_heads, self.cfg.head_dim,
                            self.rotary, capacity_frames, dtype, device)

    def _check_frames(self, frames: int) -> None:
        if frames > self.cfg.max_frames:
            raise ValueError(
                f"{frames} frames exceed model.max_frames={self.cfg.max_frames}; shorten the context/rollout "
                "or raise model.max_frames (RoPE extrapolates, but quality beyond training length is unchecked)")
