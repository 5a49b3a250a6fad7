"""3-axis rotary position embedding over (frame, row, column).

Angles are computed from integer positions on the fly, in fp32, so there is no positional table
to outgrow and no buffer for sharding wrappers to mishandle.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_positions(
    frame_start: int, num_frames: int, rows: int, cols: int, device: torch.device | None = None
) -> Tensor:
    """(num_frames*rows*cols, 3) integer positions, frame-major then row-major."""
    frames = torch.arange(frame_start, frame_start + num_frames, device=device)
    grid = torch.meshgrid(frames, torch.arange(rows, device=device), torch.arange(cols, device=device),
                          indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def round_through_bf16(positions: Tensor) -> Tensor:
    """Positions as the official release computes them, held in bf16: integers above 256 lose
    their low bits (257 -> 256, 259 -> 260), the ones below are exact."""
    return positions.to(torch.bfloat16).to(positions.dtype)


def rope_angles(positions: Tensor, axes_dim: list[int], theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (L, head_dim/2) for ``positions`` of shape (L, 3)."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
        parts.append(positions[:, axis].to(torch.float64)[:, None] * inv_freq[None, :])
    angles = torch.cat(parts, dim=-1).to(torch.float32)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` (B, H, L, Dh) by the angles; math in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    real, imag = xf[..., 0], xf[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
