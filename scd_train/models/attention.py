"""Frame-block-causal attention: masks, kernel dispatch and a preallocated KV cache.

A query token in frame f sees every key token of frames <= f (bidirectional inside a frame, never
forward). The mask is a boolean (Lq, Lk) tensor for SDPA or a FlexAttention block mask on CUDA;
no additive float L x L mask is ever built. A step over a single new frame needs no mask at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: SDPA only
    BlockMask = None
    create_block_mask = flex_attention = None

AttentionMask = Union[None, Tensor, "BlockMask"]


def frame_of_token(num_tokens: int, tokens_per_frame: int, frame_start: int, device) -> Tensor:
    return frame_start + torch.arange(num_tokens, device=device) // tokens_per_frame


def frame_block_causal_mask(
    num_q_frames: int, num_kv_frames: int, tokens_per_frame: int, device: torch.device | None = None
) -> Tensor:
    """Boolean (Lq, Lk) mask, True where attention is allowed.

    The queries are the last ``num_q_frames`` frames of the ``num_kv_frames`` key frames (a prefill
    with earlier frames already in a KV cache has num_kv_frames > num_q_frames).
    """
    q_start = num_kv_frames - num_q_frames
    q_frames = frame_of_token(num_q_frames * tokens_per_frame, tokens_per_frame, q_start, device)
    k_frames = frame_of_token(num_kv_frames * tokens_per_frame, tokens_per_frame, 0, device)
    return k_frames[None, :] <= q_frames[:, None]


def flex_available(device: torch.device) -> bool:
    return create_block_mask is not None and device.type == "cuda"


@functools.lru_cache(maxsize=32)
def _flex_block_mask(num_q_frames: int, num_kv_frames: int, tokens_per_frame: int, device_str: str):
    q_start = num_kv_frames - num_q_frames

    def frame_causal(b, h, q_idx, kv_idx):
        return kv_idx // tokens_per_frame <= q_idx // tokens_per_frame + q_start

    return create_block_mask(
        frame_causal, None, None, num_q_frames * tokens_per_frame, num_kv_frames * tokens_per_frame,
        device=device_str,
    )


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def build_frame_causal_mask(
    num_q_frames: int, num_kv_frames: int, tokens_per_frame: int, device: torch.device, backend: str
) -> AttentionMask:
    """The mask object for ``attend``; None when every query may see every key."""
    if num_q_frames == 1:
        return None
    if backend == "flex" or (backend == "auto" and flex_available(device)):
        if create_block_mask is None:
            raise RuntimeError("model.attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        return _flex_block_mask(num_q_frames, num_kv_frames, tokens_per_frame, str(device))
    return frame_block_causal_mask(num_q_frames, num_kv_frames, tokens_per_frame, device)


def teacher_forcing_mask(num_frames: int, tokens_per_frame: int, device: torch.device | None = None) -> Tensor:
    """Boolean (2L, 2L) mask over [clean frames ; noisy frames] of one clip, L = F*N tokens.

    Clean frame t sees clean frames <= t (the frame-causal mask); noisy frame t sees clean frames
    < t and its own tokens, never its own clean copy, other noisy frames or anything later.
    """
    frame = torch.arange(2 * num_frames * tokens_per_frame, device=device) // tokens_per_frame
    noisy = frame >= num_frames
    index = torch.where(noisy, frame - num_frames, frame)
    return _teacher_forced(noisy[:, None], index[:, None], noisy[None, :], index[None, :])


def _teacher_forced(q_noisy: Tensor, q_index: Tensor, k_noisy: Tensor, k_index: Tensor) -> Tensor:
    earlier_clean = ~k_noisy & ((k_index < q_index) | (~q_noisy & (k_index == q_index)))
    own_frame = q_noisy & k_noisy & (k_index == q_index)
    return earlier_clean | own_frame


def teacher_forcing_mask_mod(num_frames: int, tokens_per_frame: int) -> Callable[..., Tensor]:
    """The same rule as ``teacher_forcing_mask`` as a FlexAttention mask_mod."""

    def teacher_forced(b, h, q_idx, kv_idx):
        q_frame, k_frame = q_idx // tokens_per_frame, kv_idx // tokens_per_frame
        q_noisy, k_noisy = q_frame >= num_frames, k_frame >= num_frames
        q_index = torch.where(q_noisy, q_frame - num_frames, q_frame)
        k_index = torch.where(k_noisy, k_frame - num_frames, k_frame)
        return _teacher_forced(q_noisy, q_index, k_noisy, k_index)

    return teacher_forced


@functools.lru_cache(maxsize=32)
def _flex_teacher_forcing_mask(num_frames: int, tokens_per_frame: int, device_str: str):
    length = 2 * num_frames * tokens_per_frame
    return create_block_mask(teacher_forcing_mask_mod(num_frames, tokens_per_frame), None, None, length, length,
                             device=device_str)


def build_teacher_forcing_mask(num_frames: int, tokens_per_frame: int, device: torch.device,
                               backend: str) -> AttentionMask:
    """The mask object for a teacher-forced pass over [clean frames ; noisy frames]."""
    if backend == "flex" or (backend == "auto" and flex_available(device)):
        if create_block_mask is None:
            raise RuntimeError("model.attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        return _flex_teacher_forcing_mask(num_frames, tokens_per_frame, str(device))
    return teacher_forcing_mask(num_frames, tokens_per_frame, device)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Scaled dot-product attention over (B, H, L, Dh) tensors."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _compiled_flex()(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCache:
    """Preallocated per-layer keys (already rotated) and values for streaming inference.

    ``write`` places new tokens after the committed ones and returns the visible keys/values;
    ``advance`` commits them. Writing without advancing is a scratch write that the next write
    overwrites: the dense baseline uses it for the noisy frame at every denoising step.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, capacity_tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch, num_heads, capacity_tokens, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity_tokens
        self.length = 0

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(
                f"KV cache overflow: {end} tokens requested but capacity is {self.capacity}; "
                "allocate the cache for context + generated frames")
        self.keys[layer, :, :, self.length:end] = k.to(self.keys.dtype)
        self.values[layer, :, :, self.length:end] = v.to(self.values.dtype)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
