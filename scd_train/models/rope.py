"""3-axis rotary position embedding over (frame, row, column).

Angles are computed from integer positions in float64, then kept as fp32 cos/sin. There is no
registered positional buffer for sharding wrappers to mishandle: ``RopeTable`` memoises whole-frame
tables as plain tensors per device, so a rollout computes them once instead of at every step.
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
    """Rotate adjacent channel pairs of ``x`` (B, H, L, Dh) by the angles; math in fp32.

    Written as x * [cos, cos] + swap(x) * [-sin, sin] (swap exchanges the two channels of each
    pair): the same products and sums as the complex rotation, so the result is bitwise equal to
    it, in fewer ops.
    """
    xf = x.float()
    cos2 = cos.repeat_interleave(2, dim=-1)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return _rotate(xf, cos2, sin2).to(x.dtype)


def _rotate(xf: Tensor, cos2: Tensor, signed_sin2: Tensor) -> Tensor:
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return xf * cos2 + swapped * signed_sin2


class RotaryTables:
    """cos/sin of whole frames in the layout ``apply_rotary`` takes, memoised per device.

    ``frames(first, count)`` covers frame ids first .. first+count-1 of an (rows x cols) grid,
    ``shift(delta)`` rotates by ``delta`` frames and leaves the row and column axes alone. The
    values are those ``rope_angles`` gives for the same positions; nothing here is a module
    buffer, so no wrapper shards, casts or checkpoints it.
    """

    def __init__(self, axes_dim: list[int], theta: float, rows: int, cols: int, bf16_positions: bool = False) -> None:
        self.axes_dim, self.theta, self.rows, self.cols = list(axes_dim), theta, rows, cols
        # model.reference_bf16_rope: the release holds token positions in bf16 (see round_through_bf16)
        self.bf16_positions = bf16_positions
        self._frames: dict[str, tuple[Tensor, Tensor]] = {}
        self._shifts: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    def frames(self, first: int, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(count*N, head_dim) cos and signed sin for frame ids [first, first + count)."""
        key = str(device)
        table = self._frames.get(key)
        if table is None or table[0].shape[0] < (first + count) * self.tokens_per_frame:
            held = 0 if table is None else table[0].shape[0] // self.tokens_per_frame
            table = self._build(max(first + count, 2 * held, 16), device)  # grow geometrically
            self._frames[key] = table
        n = self.tokens_per_frame
        return table[0][first * n:(first + count) * n], table[1][first * n:(first + count) * n]

    def repeated(self, frame: int, times: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(times*N, head_dim) tables of frame id ``frame`` repeated ``times`` times (the decoder's
        [context ; noisy] tokens share their ids)."""
        key = (str(device), -1 - frame, times)
        if key not in self._shifts:
            cos, sin = self.frames(frame, 1, device)
            self._shifts[key] = (cos.repeat(times, 1), sin.repeat(times, 1))
        return self._shifts[key]

    def shift(self, delta: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(1, head_dim) cos and signed sin of a rotation by ``delta`` frames."""
        key = (str(device), delta)
        if key not in self._shifts:
            with torch.inference_mode(False), torch.no_grad():
                position = torch.tensor([[delta, 0, 0]], device=device)
                self._shifts[key] = _interleaved(*rope_angles(position, self.axes_dim, self.theta))
        return self._shifts[key]

    def _build(self, num_frames: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # Tables outlive the call that builds them: keep them ordinary tensors even when that call
        # runs under inference_mode, so a later training step may use them.
        with torch.inference_mode(False), torch.no_grad():
            positions = token_positions(0, num_frames, self.rows, self.cols, device)
            if self.bf16_positions:
                positions = round_through_bf16(positions)
            return _interleaved(*rope_angles(positions, self.axes_dim, self.theta))


def _interleaved(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, table: tuple[Tensor, Tensor]) -> Tensor:
    """``apply_rope`` with a ``RotaryTables`` table (cos and signed sin already interleaved)."""
    if x.dtype == torch.float32:  # skip two no-op casts: small models are bound by op count
        return _rotate(x, *table)
    return _rotate(x.float(), *table).to(x.dtype)
