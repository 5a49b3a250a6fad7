"""Separable Causal Diffusion: the causal encoder and the frame-wise decoder as one module."""

from __future__ import annotations

from torch import Tensor, nn

from scd_train.config import ModelConfig
from scd_train.models.decoder import FrameDecoder
from scd_train.models.encoder import CausalEncoder


class SCDModel(nn.Module):
    """Parameters are named ``encoder.*`` and ``decoder.*``; optimizer groups rely on the prefix.

    ``forward`` is the training pass: one encoder call over the clip, one decoder call over every
    (target frame, noise draw) pair, so wrappers (FSDP2, DeepSpeed) see a single root forward and
    no module runs twice in a step.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = CausalEncoder(cfg)
        self.decoder = FrameDecoder(cfg)

    @property
    def stream_frame_limit(self) -> int | None:
        """Frames a stream may hold in all (context + generated); None: unbounded (a window)."""
        return self.encoder.window.stream_limit(self.cfg.max_frames)

    def forward(self, encoder_latents: Tensor, encoder_actions: Tensor | None, noisy: Tensor,
                timesteps: Tensor, decoder_actions: Tensor | None, context_index: Tensor) -> Tensor:
        """Velocity predictions (B', C, H, W) for decoder samples.

        Args:
            encoder_latents: (B, F, C, H, W) frames the encoder reads.
            encoder_actions: (B, F) next-frame actions aligned to those frames.
            noisy: (B', C, H, W) noisy target frames.
            timesteps: (B',) their timesteps.
            decoder_actions: (B',) each target frame's own action.
            context_index: (B',) flat index into the encoder's B*F frames: sample j is rendered from
                the context tokens of frame ``context_index[j]`` (its previous frame).
        """
        context = self.encoder(encoder_latents, encoder_actions)
        context = context.flatten(0, 1)[context_index]
        return self.decoder(noisy, timesteps, context, decoder_actions)
