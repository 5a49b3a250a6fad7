"""The single-stream DiT block shared by encoder, decoder and the dense baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scd_train.models.attention import AttentionMask, KVCache, attend
from scd_train.models.layers import gate, modulate, xavier_uniform_blocks_
from scd_train.models.rope import apply_rope


@dataclass
class BlockContext:
    """Per-forward inputs every block needs; built once per model call, not per block."""

    cond_act: Tensor  # SiLU of the per-frame conditioning vector, (B, F, D)
    tokens_per_frame: int
    rope: tuple[Tensor, Tensor]  # cos, sin of shape (L, head_dim/2)
    mask: AttentionMask
    kv_cache: KVCache | None = None


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and GELU MLP, with QK RMSNorm and 3-axis RoPE.

    Modulation is computed once per frame and broadcast over that frame's tokens.
    """

    def __init__(self, width: int, num_heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn_modulation = nn.Linear(width, 3 * width)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp_modulation = nn.Linear(width, 3 * width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: Tensor, ctx: BlockContext, layer_index: int = 0) -> Tensor:
        n = ctx.tokens_per_frame
        shift, scale, gate_attn = self.attn_modulation(ctx.cond_act).chunk(3, dim=-1)
        h = self.attention(modulate(self.attn_norm(x), shift, scale, n), ctx, layer_index)
        x = x + gate(h, gate_attn, n)
        shift, scale, gate_mlp = self.mlp_modulation(ctx.cond_act).chunk(3, dim=-1)
        h = self.mlp(modulate(self.mlp_norm(x), shift, scale, n))
        return x + gate(h, gate_mlp, n)

    def attention(self, x: Tensor, ctx: BlockContext, layer_index: int) -> Tensor:
        q, k, v = self.project_qkv(x, ctx)
        if ctx.kv_cache is not None:
            k, v = ctx.kv_cache.write(layer_index, k, v)
        out = attend(q, k, v, ctx.mask)
        return self.out(out.transpose(1, 2).flatten(2))

    def project_qkv(self, x: Tensor, ctx: BlockContext) -> tuple[Tensor, Tensor, Tensor]:
        """(B, H, L, Dh) queries and keys (normalized, rotated) and values."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        cos, sin = ctx.rope
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        return q, k, v

    @torch.no_grad()
    def init_weights(self) -> None:
        """The release's initialisation, run after Xavier on every linear of the model.

        q, k and v are stored fused as one 3D x D matrix, but the release has three D x D
        projections: Xavier over the fused matrix would give each of them 1/sqrt(2) of the
        release's std, so each D x D block is initialised on its own. adaLN-Zero modulation
        starts at zero, so every block starts as the identity.
        """
        xavier_uniform_blocks_(self.qkv.weight, 3)
        nn.init.zeros_(self.qkv.bias)
        for layer in (self.attn_modulation, self.mlp_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
