"""Frame-block-causal attention: masks, kernel dispatch and the two KV-cache policies.

A query token in frame f sees every key token of frames <= f (bidirectional inside a frame, never
forward). The mask is a boolean (Lq, Lk) tensor for SDPA or a FlexAttention block mask on CUDA;
no additive float L x L mask is ever built. A step over a single new frame needs no mask at all.

With a window (``model.encoder_window`` W, ``model.encoder_sink_frames`` S) frame f sees its own
frame, the W - 1 frames before it and the first S frames of the clip (the sinks), nothing else.

Frame positions (the rule RoPE sees, in training and at inference alike). A frame is always
encoded as if it sat inside the first S + W frames of a clip: with P = S + W - 1,

* a window key keeps its true distance to the query, f - g, which is in [0, W - 1];
* a sink g of a query f > P is placed at distance P - g, as if the window started right after
  the sinks (the layout of frame P of a clip); queries f <= P see the sinks where they are.

RoPE makes an attention logit depend on the two frame ids only through their difference, so
this fixes every logit: no distance the model meets ever exceeds P <= max_frames - 1, however
long the stream runs, and every distance is one that training clips of at least S + W frames
contain in the same role (frame P of each clip sees exactly the layout every later stream frame
sees). Pinning the sinks this way, instead of leaving them at their true distance, is what keeps
the distances bounded; keeping the window's true distances keeps motion within the window
exactly as trained. In training the pinned sinks are extra keys: the sinks' keys rotated on by
f - P frames for each query frame f > P (``SinkCopies``). The ring cache realises the same
logits with keys rotated once, when written, at their slot id (< S + W), and per-group query
rotations (``RingKVCache``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from scd_train.models.rope import RotaryTables, apply_rotary

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: SDPA only
    BlockMask = None
    create_block_mask = flex_attention = None

AttentionMask = Union[None, Tensor, "BlockMask"]


@dataclass(frozen=True)
class AttentionWindow:
    """Which earlier frames a frame attends to: all of them (``frames=None``), or its own frame,
    the ``frames - 1`` before it and the first ``sinks`` frames."""

    frames: int | None = None
    sinks: int = 0

    @classmethod
    def of(cls, cfg) -> AttentionWindow:
        """The window of a ``ModelConfig``."""
        return cls(cfg.encoder_window, cfg.encoder_sink_frames)

    @property
    def bounded(self) -> bool:
        return self.frames is not None

    @property
    def span(self) -> int:
        """Frames a windowed query can see at most (sinks + window): the ring cache's slots."""
        assert self.frames is not None
        return self.sinks + self.frames

    def stream_limit(self, max_frames: int) -> int | None:
        """Frames a stream may hold in all: ``max_frames`` for the full history, none for a window."""
        return None if self.bounded else max_frames

    def sink_copies(self, num_frames: int) -> int:
        """Query frames of a clip of ``num_frames`` frames that see pinned sinks (frames > S+W-1)."""
        if self.frames is None or self.sinks == 0:
            return 0
        return max(0, num_frames - self.span)


def window_backend_problem(backend: str, window: int | None, sinks: int) -> str | None:
    """Why attention backend ``backend`` cannot express a window, or None when it can.

    SDPA takes the window as a boolean mask and FlexAttention as a mask_mod; both express any
    window and sinks. FlexAttention needs a torch that ships it.
    """
    if window is not None and backend == "flex" and create_block_mask is None:
        return (f"model.attention='flex' cannot express model.encoder_window={window} "
                f"(model.encoder_sink_frames={sinks}): this torch has no torch.nn.attention.flex_attention; "
                "use model.attention=sdpa or auto")
    return None


def frame_of_token(num_tokens: int, tokens_per_frame: int, frame_start: int, device) -> Tensor:
    return frame_start + torch.arange(num_tokens, device=device) // tokens_per_frame


def _visible(q_frame: Tensor, k_frame: Tensor, window: AttentionWindow) -> Tensor:
    """The window rule over broadcastable frame ids (sinks of queries > S+W-1 excluded: they see
    pinned copies instead)."""
    causal = k_frame <= q_frame
    if window.frames is None:
        return causal
    in_window = q_frame - k_frame < window.frames
    sink_in_place = (k_frame < window.sinks) & (q_frame < window.span)
    return causal & (in_window | sink_in_place)


def frame_block_causal_mask(
    num_q_frames: int, num_kv_frames: int, tokens_per_frame: int, device: torch.device | None = None,
    window: AttentionWindow = AttentionWindow(),
) -> Tensor:
    """Boolean (Lq, Lk) mask, True where attention is allowed.

    The queries are the last ``num_q_frames`` frames of the ``num_kv_frames`` key frames (a prefill
    with earlier frames already in a KV cache has num_kv_frames > num_q_frames). With sinks, the
    keys are followed by ``window.sink_copies(num_kv_frames)`` blocks of pinned sink keys, block c
    (from 1) seen by query frame S + W - 1 + c only.
    """
    q_start = num_kv_frames - num_q_frames
    q_frames = frame_of_token(num_q_frames * tokens_per_frame, tokens_per_frame, q_start, device)
    k_frames = frame_of_token(num_kv_frames * tokens_per_frame, tokens_per_frame, 0, device)
    mask = _visible(q_frames[:, None], k_frames[None, :], window)
    copies = window.sink_copies(num_kv_frames)
    if copies:
        copy_index = frame_of_token(copies * window.sinks * tokens_per_frame, window.sinks * tokens_per_frame, 1,
                                    device)
        pinned = q_frames[:, None] == (window.span - 1 + copy_index)[None, :]
        mask = torch.cat([mask, pinned], dim=1)
    return mask


def window_mask_mod(num_q_frames: int, num_kv_frames: int, tokens_per_frame: int, window: AttentionWindow):
    """``frame_block_causal_mask`` as a FlexAttention mask_mod over token indices."""
    q_start = num_kv_frames - num_q_frames
    n = tokens_per_frame
    plain_keys = num_kv_frames * n
    copies = window.sink_copies(num_kv_frames)
    sink_tokens = window.sinks * n

    def frame_window(b, h, q_idx, kv_idx):
        q_frame = q_idx // n + q_start
        allowed = _visible(q_frame, kv_idx // n, window) & (kv_idx < plain_keys)
        if copies:
            copy = (kv_idx - plain_keys) // sink_tokens + 1
            allowed = allowed | ((kv_idx >= plain_keys) & (q_frame == window.span - 1 + copy))
        return allowed

    return frame_window


def flex_available(device: torch.device) -> bool:
    return create_block_mask is not None and device.type == "cuda"


@functools.lru_cache(maxsize=32)
def _flex_block_mask(num_q_frames: int, num_kv_frames: int, tokens_per_frame: int, device_str: str,
                     window: AttentionWindow):
    keys = (num_kv_frames + window.sink_copies(num_kv_frames) * window.sinks) * tokens_per_frame
    return create_block_mask(
        window_mask_mod(num_q_frames, num_kv_frames, tokens_per_frame, window), None, None,
        num_q_frames * tokens_per_frame, keys, device=device_str,
    )


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def build_frame_causal_mask(
    num_q_frames: int, num_kv_frames: int, tokens_per_frame: int, device: torch.device, backend: str,
    window: AttentionWindow = AttentionWindow(),
) -> AttentionMask:
    """The mask object for ``attend``; None when every query may see every key."""
    if num_q_frames == 1:
        # one new frame: it sees the whole history, or (windowed) the cache picks what it sees
        return None
    if backend == "flex" or (backend == "auto" and flex_available(device)):
        if create_block_mask is None:
            raise RuntimeError("model.attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        return _flex_block_mask(num_q_frames, num_kv_frames, tokens_per_frame, str(device), window)
    return frame_block_causal_mask(num_q_frames, num_kv_frames, tokens_per_frame, device, window)


def frame_attention_inputs(window: AttentionWindow, rotary: RotaryTables, backend: str, frames: int, first: int,
                           kv_cache: KVCache | RingKVCache | None, device: torch.device):
    """(mask, pinned sink copies, RoPE tables) of a forward over ``frames`` frames from stream frame
    ``first``: a whole clip without a cache, or frames appended after the cached ones."""
    n = rotary.tokens_per_frame
    if kv_cache is None:
        return (build_frame_causal_mask(frames, frames, n, device, backend, window),
                SinkCopies.build(window, frames, rotary, device), rotary.frames(first, frames, device))
    return (build_frame_causal_mask(frames, first + frames, n, device, backend, window), None,
            rotary.frames(kv_cache.frame_id(first), frames, device))


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


@dataclass
class SinkCopies:
    """Pinned sink keys of an uncached windowed forward (see the module docstring).

    Copy c (1-based) of the S*N sink keys is rotated on by c frames, so query frame S+W-1+c, the
    only one that sees it, finds sink g at distance S+W-1-g.
    """

    sink_tokens: int
    copies: int
    rotation: tuple[Tensor, Tensor]  # (copies * sink_tokens, head_dim) cos / signed sin

    @classmethod
    def build(cls, window: AttentionWindow, num_frames: int, rotary: RotaryTables,
              device: torch.device) -> SinkCopies | None:
        copies = window.sink_copies(num_frames)
        if copies == 0:
            return None
        tokens = window.sinks * rotary.tokens_per_frame
        tables = [rotary.shift(c, device) for c in range(1, copies + 1)]
        cos = torch.cat([t[0].expand(tokens, -1) for t in tables])
        sin = torch.cat([t[1].expand(tokens, -1) for t in tables])
        return cls(tokens, copies, (cos, sin))

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, L, Dh) followed by the pinned copies of their sink tokens."""
        pinned_k = apply_rotary(k[:, :, :self.sink_tokens].repeat(1, 1, self.copies, 1), self.rotation)
        pinned_v = v[:, :, :self.sink_tokens].repeat(1, 1, self.copies, 1)
        return torch.cat([k, pinned_k], dim=2), torch.cat([v, pinned_v], dim=2)


class _CacheStorage:
    """Per-layer keys and values of fixed capacity, allocated once, at the first write, in the
    dtype attention computes in (bf16 under bf16 autocast), unless a dtype is given up front."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, capacity_tokens: int, head_dim: int,
                 dtype: torch.dtype | None, device: torch.device | str) -> None:
        self.shape = (num_layers, batch, num_heads, capacity_tokens, head_dim)
        self.device = device
        self.capacity = capacity_tokens
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        if dtype is not None:
            self._allocate(dtype)

    def _allocate(self, dtype: torch.dtype) -> None:
        self.keys = torch.empty(self.shape, dtype=dtype, device=self.device)
        self.values = torch.empty(self.shape, dtype=dtype, device=self.device)

    def _store(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        if self.keys is None:
            self._allocate(k.dtype)
        end = start + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's storage (0 before the first write)."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class KVCache(_CacheStorage):
    """Full history: per-layer keys (already rotated) and values for streaming inference.

    ``write`` places new tokens after the committed ones and returns the visible keys/values;
    ``advance`` commits them. Writing without advancing is a scratch write that the next write
    overwrites: the dense baseline uses it for the noisy frame at every denoising step.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, capacity_tokens: int, head_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(num_layers, batch, num_heads, capacity_tokens, head_dim, dtype, device)
        self.length = 0

    def pieces(self, first_frame: int, frames: int) -> list[tuple[int, int]]:
        """How a call over ``frames`` new frames is split: one piece, (first frame, count)."""
        return [(first_frame, frames)]

    def frame_id(self, frame: int) -> int:
        """The frame id rotary embedding uses for stream frame ``frame``: the frame itself."""
        return frame

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(
                f"KV cache overflow: {end} tokens requested but capacity is {self.capacity}; "
                "allocate the cache for context + generated frames")
        if self.keys is not None:
            k, v = k.to(self.keys.dtype), v.to(self.values.dtype)
        self._store(layer, self.length, k, v)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        keys, values = self.write(layer, k, v)
        return attend(q.to(keys.dtype), keys, values, mask)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class RingKVCache(_CacheStorage):
    """A windowed stream's keys and values in S + W frame slots, overwritten in place for ever.

    Slot s < S holds sink frame s; frame f >= S lives in slot S + (f - S) mod W, so the frame it
    replaces is the one that just left the window. Keys are rotated once, when written, at their
    slot id. While the stream is shorter than S + W frames the slot id is the frame itself and the
    cache works exactly like the full-history one (a contiguous prefix, one SDPA call). After
    that every call is one frame, attended with three query rotations, one per key group, so the
    logits are those of the position rule in the module docstring:

    * sinks (slots < S): the query rotated to id S + W - 1, the pinned layout;
    * slots S..S+r (frames from the latest wrap to the query, which sits in slot S + r): the
      query at its own slot id, the true distances;
    * slots S+r+1..S+W-1 (older frames, before the wrap): the query rotated W frames further,
      their true distance again.

    A write without ``advance`` is a scratch write into the slot of the frame being made (the
    dense baseline's noisy frame); it only overwrites the frame leaving the window.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, window: AttentionWindow,
                 rotary: RotaryTables, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> None:
        if not window.bounded:
            raise ValueError("a ring cache needs a bounded window (model.encoder_window)")
        self.window = window
        self.rotary = rotary
        self.tokens_per_frame = rotary.tokens_per_frame
        super().__init__(num_layers, batch, num_heads, window.span * self.tokens_per_frame, head_dim, dtype, device)
        self.frames = 0  # committed frames: the stream position of the next write

    @property
    def length(self) -> int:
        """Committed tokens currently held (at most the S + W slots)."""
        return min(self.frames, self.window.span) * self.tokens_per_frame

    def pieces(self, first_frame: int, frames: int) -> list[tuple[int, int]]:
        """Frames before S + W as one piece (a plain prefix), every later frame on its own."""
        if first_frame != self.frames:
            raise ValueError(f"a ring cache appends at frame {self.frames}, got frames from {first_frame}")
        prefix = max(0, min(frames, self.window.span - first_frame))
        out = [(first_frame, prefix)] if prefix else []
        return out + [(f, 1) for f in range(first_frame + prefix, first_frame + frames)]

    def frame_id(self, frame: int) -> int:
        """The slot id of stream frame ``frame``: its rotary frame id (always < S + W)."""
        s, w = self.window.sinks, self.window.frames
        return frame if frame < s + w else s + (frame - s) % w

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        n = self.tokens_per_frame
        first, count = self.frames, k.shape[2] // n
        if self.keys is not None:
            q, k, v = q.to(self.keys.dtype), k.to(self.keys.dtype), v.to(self.values.dtype)
        if first + count <= self.window.span:  # still filling: the plain prefix
            self._store(layer, first * n, k, v)
            end = (first + count) * n
            return attend(q, self.keys[layer, :, :, :end], self.values[layer, :, :, :end], mask)
        if count != 1:
            raise ValueError(f"a full ring cache takes one frame per call, got {count} (use pieces())")
        slot = self.frame_id(first)
        self._store(layer, slot * n, k, v)
        return self._grouped_attention(layer, q, slot - self.window.sinks)

    def _grouped_attention(self, layer: int, q: Tensor, r: int) -> Tensor:
        n, s, w = self.tokens_per_frame, self.window.sinks, self.window.frames
        keys, values = self.keys[layer], self.values[layer]
        parts = []
        if s:
            sink_q = apply_rotary(q, self.rotary.shift(w - 1 - r, q.device))
            parts.append(sink_q @ keys[:, :, :s * n].transpose(-1, -2))
        parts.append(q @ keys[:, :, s * n:(s + r + 1) * n].transpose(-1, -2))
        if r < w - 1:
            older_q = apply_rotary(q, self.rotary.shift(w, q.device))
            parts.append(older_q @ keys[:, :, (s + r + 1) * n:].transpose(-1, -2))
        logits = torch.cat(parts, dim=-1) * q.shape[-1] ** -0.5
        return logits.float().softmax(dim=-1).to(values.dtype) @ values

    def advance(self, num_tokens: int) -> None:
        self.frames += num_tokens // self.tokens_per_frame


def new_kv_cache(window: AttentionWindow, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 rotary: RotaryTables, capacity_frames: int | None, dtype: torch.dtype | None,
                 device: torch.device | str) -> KVCache | RingKVCache:
    """The cache policy the model config asks for: a ring for a window, else the full history.

    ``capacity_frames`` bounds a full-history cache and is ignored by a ring, which holds S + W.
    """
    if window.bounded:
        return RingKVCache(num_layers, batch, num_heads, head_dim, window, rotary, dtype, device)
    if capacity_frames is None:
        raise ValueError("a full-history KV cache needs capacity_frames")
    return KVCache(num_layers, batch, num_heads, capacity_frames * rotary.tokens_per_frame, head_dim, dtype, device)
