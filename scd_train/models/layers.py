"""Small building blocks shared by the encoder, the decoder and the dense baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

CLEAN_TIMESTEP = -1.0
"""Timestep label of a clean frame (context or teacher-forced history)."""

TIME_FREQ_CHANNELS = 256


def sinusoidal_timestep_features(timesteps: Tensor, channels: int = TIME_FREQ_CHANNELS) -> Tensor:
    """Cos-first sinusoidal features with frequency shift 1, always computed in fp32.

    fp32 matters: bf16 cannot represent integer timesteps above 256 exactly, which would quantize
    t in [512, 1000] to steps of 4.
    """
    half = channels // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - 1))
    angles = timesteps.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the timestep, then a 2-layer MLP.

    ``bf16_timesteps`` reproduces the release, which casts timesteps to bf16 before the features.
    """

    def __init__(self, width: int, bf16_timesteps: bool = False) -> None:
        super().__init__()
        self.bf16_timesteps = bf16_timesteps
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_CHANNELS, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, timesteps: Tensor) -> Tensor:
        if self.bf16_timesteps:
            timesteps = timesteps.to(torch.bfloat16)
        features = sinusoidal_timestep_features(timesteps)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ActionEmbedding(nn.Module):
    """Per-frame action table whose last row (id == num_actions) is the null action."""

    def __init__(self, num_actions: int, width: int, dropout: float) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.dropout = dropout
        self.table = nn.Embedding(num_actions + 1, width)

    @property
    def null_id(self) -> int:
        return self.num_actions

    def forward(self, actions: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(actions.shape, device=actions.device) < self.dropout
            actions = torch.where(drop, torch.full_like(actions, self.null_id), actions)
        return self.table(actions)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, tokens_per_frame: int) -> Tensor:
    """x * (1 + scale) + shift with per-frame (B, F, D) modulation broadcast over tokens."""
    return modulate_terms(x, shift[:, :, None], 1 + scale[:, :, None], tokens_per_frame)


def gate(x: Tensor, gate_values: Tensor, tokens_per_frame: int) -> Tensor:
    return gate_terms(x, gate_values[:, :, None], tokens_per_frame)


def modulate_terms(x: Tensor, shift: Tensor, scale_plus_one: Tensor, tokens_per_frame: int) -> Tensor:
    """``modulate`` with its terms prepared ahead, each (B, F, 1, D): the same arithmetic, so a
    caller that prepares them once (e.g. for every step of a frame) gets bitwise the same result."""
    if shift.dim() == x.dim():  # (B, 1, D) terms of a one-frame input broadcast over its tokens directly
        return x * scale_plus_one + shift
    frames = x.unflatten(1, (-1, tokens_per_frame))
    return (frames * scale_plus_one + shift).flatten(1, 2)


def gate_terms(x: Tensor, gate_values: Tensor, tokens_per_frame: int) -> Tensor:
    """``gate`` with (B, F, 1, D) gate values (or (B, 1, D) for a one-frame input)."""
    if gate_values.dim() == x.dim():
        return x * gate_values
    return (x.unflatten(1, (-1, tokens_per_frame)) * gate_values).flatten(1, 2)


def modulation_terms(modulation: Tensor, parts: int) -> tuple[Tensor, ...]:
    """Split a (..., F, parts*D) adaLN output into broadcast-ready (..., F, 1, D) terms, with every
    scale (the second of each shift/scale/gate or shift/scale group) turned into 1 + scale."""
    chunks = modulation.unsqueeze(-2).chunk(parts, dim=-1)
    group = 3 if parts % 3 == 0 else 2
    return tuple(1 + c if i % group == 1 else c for i, c in enumerate(chunks))


class PatchEmbed(nn.Module):
    """Latent frames (B, F, C, H, W) -> tokens (B, F*N, D) with N = (H/p)*(W/p)."""

    def __init__(self, channels: int, patch: int, width: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, width)

    def forward(self, latents: Tensor) -> Tensor:
        p = self.patch
        tokens = rearrange(latents, "b f c (h p1) (w p2) -> b (f h w) (c p1 p2)", p1=p, p2=p)
        dtype = self.proj.weight.dtype
        return self.proj(tokens if tokens.dtype == dtype else tokens.to(dtype))


def unpatchify(tokens: Tensor, frames: int, channels: int, height: int, width: int, patch: int) -> Tensor:
    """(B, F*N, C*p*p) -> (B, F, C, H, W)."""
    p = patch
    return rearrange(tokens, "b (f h w) (c p1 p2) -> b f c (h p1) (w p2)",
                     f=frames, h=height // p, w=width // p, c=channels, p1=p, p2=p)


class AdaptiveOutputNorm(nn.Module):
    """LayerNorm without affine parameters, then per-frame shift/scale from the conditioning.

    ``noise_std`` perturbs the normalized features before modulation (SCD's context noise).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)

    def forward(self, x: Tensor, cond_act: Tensor, tokens_per_frame: int,
                noise: Tensor | None = None, terms: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``terms``: this layer's ``modulation_terms`` prepared ahead (cond_act is then unused)."""
        shift, scale_plus_one = terms if terms is not None else self.terms(cond_act)
        normed = self.norm(x)
        if noise is not None:
            normed = normed + noise.to(normed.dtype)
        return modulate_terms(normed, shift, scale_plus_one, tokens_per_frame)

    def terms(self, cond_act: Tensor) -> tuple[Tensor, Tensor]:
        """(shift, 1 + scale), each (..., F, 1, D), for conditioning ``cond_act`` (..., F, D)."""
        return modulation_terms(self.modulation(cond_act), 2)


def init_linear_xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def xavier_uniform_blocks_(weight: Tensor, num_blocks: int) -> None:
    """Xavier-uniform on each of ``num_blocks`` row blocks of a fused weight, as separate layers.

    A fused (num_blocks * out, in) matrix would otherwise get the bounds of one wide layer, whose
    larger fan-out shrinks every block's std.
    """
    if weight.shape[0] % num_blocks:
        raise ValueError(f"a weight of {weight.shape[0]} rows does not split into {num_blocks} blocks")
    for block in weight.chunk(num_blocks, dim=0):
        nn.init.xavier_uniform_(block)


def zero_(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def init_conditioning(time_embed: TimestepEmbedding, action_embed: ActionEmbedding | None) -> None:
    for layer in (time_embed.mlp[0], time_embed.mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    if action_embed is not None:
        nn.init.normal_(action_embed.table.weight, std=0.02)


def embed_conditioning(time_embed: TimestepEmbedding, action_embed: ActionEmbedding | None, timesteps: Tensor,
                       actions: Tensor | None) -> Tensor:
    """SiLU of timestep embedding + action embedding (..., D) for timesteps and actions of one shape;
    no actions means the null action wherever the model is action-conditioned."""
    cond = time_embed(timesteps)
    if action_embed is not None:
        if actions is None:
            actions = torch.full(timesteps.shape, action_embed.null_id, device=timesteps.device, dtype=torch.long)
        cond = cond + action_embed(actions)
    return silu(cond)


def silu(x: Tensor) -> Tensor:
    return F.silu(x)
