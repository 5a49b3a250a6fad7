"""Analytic FLOP counts (multiply-add = 2 FLOPs) for training steps and per generated frame.

Counted: every matmul (patch embed, adaLN modulation per frame, q/k/v/out, MLP, attention
scores and weighted sums, output projection). Not counted: norms, RoPE, softmax, elementwise ops.
Training = 3 x forward (backward costs two forwards).
"""

from __future__ import annotations

from dataclasses import dataclass

from scd_train.config import Config, ModelConfig


def tokens_per_frame(m: ModelConfig) -> int:
    return (m.latent_height // m.patch_size) * (m.latent_width // m.patch_size)


def block_flops(m: ModelConfig, tokens: int, frames: int, attention_pairs: int) -> float:
    d = m.width
    linear = 2 * tokens * d * d * (4 + 2 * m.mlp_ratio)
    modulation = 2 * frames * d * 6 * d
    attention = 4 * d * attention_pairs
    return linear + modulation + attention


def causal_pairs(new_frames: int, cached_frames: int, n: int, m: ModelConfig | None = None) -> int:
    """Query-key pairs when ``new_frames`` frames attend frame-causally after ``cached_frames``
    (within ``m``'s encoder window, when it has one)."""
    return sum(n * visible_frames(cached_frames + f, m) * n for f in range(new_frames))


def visible_frames(frame: int, m: ModelConfig | None = None) -> int:
    """Key frames frame ``frame`` attends to, its own included: all earlier ones, or its window
    plus the sink frames that have left the window."""
    if m is None or m.encoder_window is None:
        return frame + 1
    w = m.encoder_window
    return min(frame + 1, w) + max(0, min(m.encoder_sink_frames, frame + 1 - w))


def _embed_and_head(m: ModelConfig, tokens: int, frames: int, with_projection: bool) -> float:
    patch_dim = m.latent_channels * m.patch_size**2
    flops = 2 * tokens * patch_dim * m.width + 2 * frames * m.width * 2 * m.width
    if with_projection:
        flops += 2 * tokens * m.width * patch_dim
    return flops


def encoder_forward(m: ModelConfig, new_frames: int, cached_frames: int = 0) -> float:
    n = tokens_per_frame(m)
    tokens = new_frames * n
    per_block = block_flops(m, tokens, new_frames, causal_pairs(new_frames, cached_frames, n, m))
    return m.encoder_layers * per_block + _embed_and_head(m, tokens, new_frames, with_projection=False)


def decoder_forward(m: ModelConfig, samples: int) -> float:
    n = tokens_per_frame(m)
    group = 2 if m.fusion in ("token_concat", "token_concat_with_proj") else 1
    tokens = group * n
    per_sample = m.decoder_layers * block_flops(m, tokens, 1, tokens * tokens)
    per_sample += _embed_and_head(m, n, 1, with_projection=True)
    if m.fusion == "channel_concat":
        per_sample += 2 * n * 2 * m.width * m.width
    if m.fusion == "token_concat_with_proj":  # the alignment Linear on the context tokens
        per_sample += 2 * n * m.width * m.width
    return samples * per_sample


def causal_dit_forward(m: ModelConfig, new_frames: int, cached_frames: int = 0) -> float:
    n = tokens_per_frame(m)
    tokens = new_frames * n
    per_block = block_flops(m, tokens, new_frames, causal_pairs(new_frames, cached_frames, n, m))
    return m.layers * per_block + _embed_and_head(m, tokens, new_frames, with_projection=True)


def causal_dit_teacher_forced_forward(m: ModelConfig, frames: int) -> float:
    """A teacher-forced pass: clean and noisy copies of ``frames`` frames, twice the tokens. Noisy
    frame t attends to t clean frames and itself, as many pairs as the clean copy's causal mask."""
    n = tokens_per_frame(m)
    tokens = frames * n
    per_block = block_flops(m, 2 * tokens, 2 * frames, 2 * causal_pairs(frames, 0, n))
    clean_embed = 2 * tokens * m.latent_channels * m.patch_size**2 * m.width  # the head runs on the noisy copy
    return m.layers * per_block + _embed_and_head(m, tokens, frames, with_projection=True) + clean_embed


@dataclass
class StepFlops:
    encoder: float  # per optimizer step per rank (the dense baseline counts here as "encoder")
    decoder: float

    @property
    def total(self) -> float:
        return self.encoder + self.decoder


def train_step_flops(cfg: Config, clip_frames: int | None = None) -> StepFlops:
    """FLOPs of one optimizer step on one rank (micro-batch x grad_accum clips)."""
    m, d = cfg.model, cfg.diffusion
    frames = clip_frames or cfg.data.clip_frames
    clips = cfg.data.batch_size * cfg.train.grad_accum
    targets = frames - 1 if d.target_window is None else min(d.target_window, frames - 1)
    if m.arch == "scd":
        enc = 3 * clips * encoder_forward(m, frames)
        dec = 3 * clips * decoder_forward(m, d.decoder_multi_batch * targets)
        return StepFlops(enc, dec)
    forward = (causal_dit_teacher_forced_forward(m, frames) if m.encoder_input == "clean"
               else causal_dit_forward(m, frames))
    return StepFlops(3 * clips * d.decoder_multi_batch * forward, 0.0)


def generated_frame_flops(m: ModelConfig, context_frames: int, steps: int, guided: bool) -> StepFlops:
    """Inference FLOPs to produce one frame after ``context_frames`` frames, batch 1."""
    branches = 2 if guided else 1
    if m.arch == "scd":
        return StepFlops(encoder_forward(m, 1, context_frames - 1), steps * decoder_forward(m, branches))
    denoise = steps * branches * causal_dit_forward(m, 1, context_frames)
    commit = branches * causal_dit_forward(m, 1, context_frames)
    return StepFlops(commit, denoise)


PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.1, "L4": 121.0, "B200": 2250.0, "GB200": 2500.0}


def detect_peak_tflops(device) -> float | None:
    """Dense bf16 peak of known GPUs (SXM variants); None on CPU or an unknown device."""
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None
