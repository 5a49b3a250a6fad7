"""The paper's two probes of a dense causal model, recorded while it denoises one new frame.

1. Feature similarity: for every layer, the cosine similarity of its output features (per token,
   averaged) between every pair of denoising steps. High similarity across steps means the layer
   computes nearly the same thing at every step: work an encoder could do once per frame.
2. Attention to the past: for every layer and step, the share of attention mass the new frame's
   queries put on tokens of earlier (context) frames, and the mass per key frame. Layers with a
   share near zero work within the frame, like SCD's frame-wise decoder.

Recording uses forward pre-hooks and forward hooks on the transformer blocks; the attention
weights are recomputed from each block's inputs with the block's own projections, so the model's
computation and outputs are untouched and the model code has no probe logic in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scd_train.diffusion.sampling import CausalDiTStream, SamplerSettings, euler_sigmas
from scd_train.models.attention import RingKVCache
from scd_train.models.block import BlockContext, DiTBlock
from scd_train.models.causal_dit import CausalDiT
from scd_train.models.layers import modulate


def attention_probabilities(block: DiTBlock, x: Tensor, ctx: BlockContext, layer: int) -> Tensor:
    """(B, heads, Lq, Lk) attention weights ``block`` uses for input ``x``, in fp32.

    Keys include the frames already in the KV cache (committed before this call).
    """
    n = ctx.tokens_per_frame
    cache = ctx.kv_cache
    if isinstance(cache, RingKVCache) and cache.frames >= cache.window.span:
        raise TypeError(f"attention probes read the cache as one prefix, but this model's window "
                        f"(model.encoder_window={cache.window.frames}, model.encoder_sink_frames={cache.window.sinks}) "
                        f"has wrapped its ring cache; probe with fewer than {cache.window.span} context frames")
    shift, scale, _ = block.attn_modulation(ctx.cond_act).chunk(3, dim=-1)
    q, k, _ = block.project_qkv(modulate(block.attn_norm(x), shift, scale, n), ctx)
    if ctx.kv_cache is not None and ctx.kv_cache.length > 0:
        cached = ctx.kv_cache.keys[layer, :, :, :ctx.kv_cache.length]
        k = torch.cat([cached.to(k.dtype), k], dim=2)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if ctx.mask is not None:
        if not isinstance(ctx.mask, Tensor):
            raise TypeError("attention probes need SDPA boolean masks; set model.attention='sdpa'")
        logits = logits.masked_fill(~ctx.mask, float("-inf"))
    return logits.softmax(dim=-1)


def key_frame_mass(probs: Tensor, tokens_per_frame: int) -> Tensor:
    """(B, key frames) attention mass per key frame, averaged over heads and queries."""
    per_key = probs.mean(dim=(1, 2))  # (B, Lk)
    return per_key.unflatten(-1, (-1, tokens_per_frame)).sum(dim=-1)


@dataclass
class BlockRecorder:
    """Hooks on every block of a dense model; records while ``active``."""

    model: CausalDiT
    features: list[list[Tensor]] = field(default_factory=list)  # layer -> per call (B, L, D)
    frame_mass: list[list[Tensor]] = field(default_factory=list)  # layer -> per call (B, key frames)
    active: bool = False

    def __post_init__(self) -> None:
        blocks = list(self.model.blocks)
        self.features = [[] for _ in blocks]
        self.frame_mass = [[] for _ in blocks]
        self._handles = []
        for layer, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(layer)))
            self._handles.append(block.register_forward_hook(self._post_hook(layer)))

    def _pre_hook(self, layer: int):
        def hook(block, args):
            if self.active:
                x, ctx = args[0], args[1]
                probs = attention_probabilities(block, x, ctx, layer)
                self.frame_mass[layer].append(key_frame_mass(probs, ctx.tokens_per_frame).cpu())
        return hook

    def _post_hook(self, layer: int):
        def hook(block, args, output):
            if self.active:
                self.features[layer].append(output.detach().float().cpu())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def step_similarity(features: list[Tensor]) -> Tensor:
    """(T, T) mean per-token cosine similarity between the features of every pair of steps."""
    stacked = torch.stack(features).double()  # (T, B, L, D)
    unit = torch.nn.functional.normalize(stacked.flatten(1, 2), dim=-1)  # (T, M, D)
    return torch.einsum("imd,jmd->ij", unit, unit) / unit.shape[1]


@dataclass
class ProbeResult:
    sigmas: list[float]  # noise level at each recorded step
    similarity: Tensor  # (layers, T, T)
    frame_mass: Tensor  # (layers, T, key frames): attention mass per key frame, last = the new frame
    context_frames: int

    @property
    def earlier_share(self) -> Tensor:
        """(layers, T) share of attention on frames before the new one."""
        return self.frame_mass[..., :-1].sum(dim=-1)

    def summary(self) -> dict:
        layers, steps = self.similarity.shape[:2]
        off_diag = ~torch.eye(steps, dtype=torch.bool)
        share = self.earlier_share
        return {
            "layers": layers,
            "steps": steps,
            "context_frames": self.context_frames,
            "sigmas": self.sigmas,
            "feature_similarity": {
                "mean_across_steps": [float(self.similarity[i][off_diag].mean()) if steps > 1 else 1.0
                                      for i in range(layers)],
                "first_vs_last_step": [float(self.similarity[i, 0, -1]) for i in range(layers)],
                "adjacent_steps": [float(self.similarity[i].diagonal(1).mean()) if steps > 1 else 1.0
                                   for i in range(layers)],
                "matrices": self.similarity.tolist(),
            },
            "attention_to_earlier_frames": {
                "mean_over_steps": share.mean(dim=1).tolist(),
                "per_step": share.tolist(),
                "frame_mass_mean_over_steps": self.frame_mass.mean(dim=1).tolist(),
            },
        }


@torch.no_grad()
def probe_dense_model(model: CausalDiT, context: Tensor, actions: Tensor | None, steps: int,
                      num_train_timesteps: int = 1000, generator: torch.Generator | None = None) -> ProbeResult:
    """Prefill ``context`` (B, c, C, H, W), then denoise frame c over ``steps`` Euler steps with the
    recorder on. ``actions`` (B, c + 1) are the actions leading into each frame."""
    if not isinstance(model, CausalDiT):
        raise TypeError(f"probes need a dense causal model (model.arch='causal_dit'), got {type(model).__name__}")
    batch, frames = context.shape[:2]
    settings = SamplerSettings(steps=steps, cfg_scale=1.0, cfg_mode="action", num_train_timesteps=num_train_timesteps)
    # capacity == context: the generated frame is never committed, so every recorded call is a
    # denoising step of that one frame
    stream = CausalDiTStream(model, settings, batch, frames, generator)
    stream.prefill(context, None if actions is None else actions[:, :frames].to(stream.device))
    recorder = BlockRecorder(model)
    try:
        recorder.active = True
        stream.next_frame(None if actions is None else actions[:, frames].to(stream.device))
    finally:
        recorder.active = False
        recorder.remove()
    similarity = torch.stack([step_similarity(f) for f in recorder.features])
    mass = torch.stack([torch.stack(m).mean(dim=1) for m in recorder.frame_mass])  # (layers, T, key frames)
    sigmas = euler_sigmas(steps, num_train_timesteps)[:steps].tolist()
    return ProbeResult(sigmas, similarity, mass, frames)
