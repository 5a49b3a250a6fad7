"""The single-stream DiT block shared by encoder, decoder and the dense baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scd_train.models.attention import AttentionMask, KVCache, RingKVCache, SinkCopies, attend
from scd_train.models.layers import gate_terms, modulate_terms, modulation_terms, xavier_uniform_blocks_
from scd_train.models.rope import apply_rotary


@dataclass
class BlockContext:
    """Per-forward inputs every block needs; built once per model call, not per block."""

    cond_act: Tensor  # SiLU of the per-frame conditioning vector, (B, F, D)
    tokens_per_frame: int
    rope: tuple[Tensor, Tensor]  # cos, signed sin of shape (L, head_dim), from RotaryTables
    mask: AttentionMask
    kv_cache: KVCache | RingKVCache | None = None
    sink_copies: SinkCopies | None = None  # pinned sink keys of an uncached windowed forward
    # Per block ``DiTBlock.modulation_terms`` prepared ahead (e.g. for every step of a frame at
    # once, see ``StepConditioning``); None computes them from cond_act.
    modulation: list[tuple[Tensor, ...]] | None = None


@dataclass
class StepConditioning:
    """What a DiT stack derives from (timestep, action) alone, prepared ahead of its call: the
    SiLU'd conditioning, every block's modulation terms and the output norm's."""

    cond_act: Tensor  # (B, F, D)
    blocks: list[tuple[Tensor, ...]]
    output: tuple[Tensor, Tensor]


@dataclass
class StepsConditioning:
    """``StepConditioning`` of T steps stacked along a leading dimension, e.g. every denoising
    step of one frame, computed in one pass: one GEMM per modulation layer covers all T steps,
    where a step-by-step loop runs one GEMV per layer per step (the results differ by round-off)."""

    cond_act: Tensor  # (T, B, F, D)
    blocks: list[tuple[Tensor, ...]]
    output: tuple[Tensor, Tensor]

    @classmethod
    def of(cls, cond_act: Tensor, blocks, output_norm, one_frame: bool = False) -> StepsConditioning:
        """From the conditioning ``cond_act`` (T, B, F, D) of T steps. ``one_frame``: the stack
        runs on one frame per sample (F = 1), so the terms drop their frame axis, (T, B, 1, D), and
        broadcast over the tokens without reshapes."""
        blocks_terms = [block.modulation_terms(cond_act) for block in blocks]
        output = output_norm.terms(cond_act)
        if one_frame:
            blocks_terms = [tuple(t.squeeze(-3) for t in terms) for terms in blocks_terms]
            output = tuple(t.squeeze(-3) for t in output)
        return cls(cond_act, blocks_terms, output)

    def tensors(self) -> list[Tensor]:
        return [self.cond_act, *(t for terms in self.blocks for t in terms), *self.output]

    def steps(self) -> list[StepConditioning]:
        """Views of each step's conditioning (no copies)."""
        acts = self.cond_act.unbind(0)
        per_block = [[t.unbind(0) for t in terms] for terms in self.blocks]
        out = [t.unbind(0) for t in self.output]
        return [StepConditioning(acts[i], [tuple(t[i] for t in terms) for terms in per_block], (out[0][i], out[1][i]))
                for i in range(len(acts))]


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
        terms = ctx.modulation[layer_index] if ctx.modulation is not None else self.modulation_terms(ctx.cond_act)
        shift, scale, gate_attn, mlp_shift, mlp_scale, gate_mlp = terms
        h = self.attention(modulate_terms(self.attn_norm(x), shift, scale, n), ctx, layer_index)
        x = x + gate_terms(h, gate_attn, n)
        h = self.mlp(modulate_terms(self.mlp_norm(x), mlp_shift, mlp_scale, n))
        return x + gate_terms(h, gate_mlp, n)

    def modulation_terms(self, cond_act: Tensor) -> tuple[Tensor, ...]:
        """(shift, 1 + scale, gate) of attention then of the MLP, each (..., F, 1, D), for the
        conditioning ``cond_act`` (..., F, D): what adaLN needs from (timestep, action) alone."""
        return (*modulation_terms(self.attn_modulation(cond_act), 3),
                *modulation_terms(self.mlp_modulation(cond_act), 3))

    def attention(self, x: Tensor, ctx: BlockContext, layer_index: int) -> Tensor:
        q, k, v = self.project_qkv(x, ctx)
        if ctx.kv_cache is not None:
            out = ctx.kv_cache.attend(layer_index, q, k, v, ctx.mask)
        else:
            if ctx.sink_copies is not None:
                k, v = ctx.sink_copies.extend(k, v)
            out = attend(q, k, v, ctx.mask)
        return self.out(out.transpose(1, 2).flatten(2))

    def project_qkv(self, x: Tensor, ctx: BlockContext) -> tuple[Tensor, Tensor, Tensor]:
        """(B, H, L, Dh) queries and keys (normalized, rotated) and values."""
        batch, tokens = x.shape[:2]
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = apply_rotary(self.q_norm(q), ctx.rope)
        k = apply_rotary(self.k_norm(k), ctx.rope)
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
